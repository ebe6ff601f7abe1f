//! `cargo xtask demo`: a gateway whose LAN is CGNAT space, in throwaway namespaces.
//!
//! ```text
//!  lan: eth0 100.64.0.2/24, 192.0.2.2/24 ──veth── gw: eth0 100.64.0.1/24, 192.0.2.1/24 (XDP)
//!                                                  tailscale0 (TUN, TC egress)
//! ```
//! Shows the CGNAT neighbour dropped while a non-CGNAT host passes, an `allow` added with a
//! SIGHUP reload (no restart), and live counters. Everything it creates is removed when it
//! ends or is interrupted.

use std::{
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

struct Demo {
    gw: String,
    lan: String,
    pin_dir: String,
    dir: tempfile::TempDir,
    daemon: Option<Child>,
    tailgate: String,
    backend: String,
}

impl Demo {
    fn ip(&self, ns: &str, args: &str) -> Result<()> {
        let mut cmd = Command::new("ip");
        cmd.arg("-n").arg(ns).args(args.split_whitespace());
        super::run(&mut cmd)
    }

    fn ping(&self, src: &str, dst: &str) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.lan, "ping", "-c", "1", "-W", "1", "-n", "-q", "-I", src, dst])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    fn tailgate(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.gw))
            .arg(&self.tailgate)
            .args(["--pin-dir", &self.pin_dir])
            .args(args);
        cmd
    }

    fn config(&self, allow: &str) -> Result<()> {
        let text = format!(
            "tunnel = \"tailscale0\"\ninterfaces = [\"eth0\"]\nbackend = \"{}\"\n[cgnat]\nmode = \"drop\"\nallow = [{allow}]\n",
            self.backend
        );
        std::fs::write(self.dir.path().join("tailgate.toml"), text)?;
        Ok(())
    }

    fn counters(&self) -> Option<serde_json::Value> {
        let out = self.tailgate(&["status", "--json"]).output().ok()?;
        serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        println!("\n==> demo: cleaning up");
        if let Some(mut child) = self.daemon.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
        let _ = self.tailgate(&["cleanup"]).stdout(Stdio::null()).status();
        for ns in [&self.gw, &self.lan] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        println!("    removed namespaces {} and {}, pins under {}", self.gw, self.lan, self.pin_dir);
    }
}

pub fn run(seconds: u64, backend: &str) -> Result<()> {
    super::require_root("demo")?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;

    let pid = std::process::id();
    let mut demo = Demo {
        gw: format!("tgdemo-gw-{pid}"),
        lan: format!("tgdemo-lan-{pid}"),
        pin_dir: format!("/sys/fs/bpf/tailgate-demo-{pid}"),
        dir: tempfile::tempdir()?,
        daemon: None,
        tailgate: super::root().join("target/debug/tailgate").display().to_string(),
        backend: backend.to_string(),
    };
    say("building the topology");
    for ns in [&demo.gw, &demo.lan] {
        super::run(Command::new("ip").args(["netns", "add", ns]))?;
        demo.ip(ns, "link set lo up")?;
    }
    demo.ip(&demo.gw, &format!("link add eth0 type veth peer name eth0 netns {}", demo.lan))?;
    for (ns, cmds) in [
        (&demo.gw, ["addr add 100.64.0.1/24 dev eth0", "addr add 192.0.2.1/24 dev eth0", "link set eth0 up"]),
        (
            &demo.lan,
            ["addr add 100.64.0.2/24 dev eth0", "addr add 192.0.2.2/24 dev eth0", "link set eth0 up"],
        ),
    ] {
        for cmd in cmds {
            demo.ip(ns, cmd)?;
        }
    }
    demo.ip(&demo.gw, "tuntap add dev tailscale0 mode tun")?;
    demo.ip(&demo.gw, "link set tailscale0 up")?;
    println!("    gw  {}: eth0 100.64.0.1/24 + 192.0.2.1/24, tailscale0 (TUN)", demo.gw);
    println!("    lan {}: eth0 100.64.0.2/24 + 192.0.2.2/24", demo.lan);

    let before = demo.ping("100.64.0.2", "100.64.0.1");
    println!("    without tailgate: 100.64.0.2 -> 100.64.0.1 ping {}", verdict(before));

    say(&format!("starting `tailgate run` in the gateway namespace (default policy, backend {backend})"));
    demo.config("")?;
    let config = demo.dir.path().join("tailgate.toml");
    // Own process group: Ctrl-C reaches the demo, which then stops the daemon in order.
    let mut run = demo.tailgate(&["run", "--config", config.to_str().unwrap()]);
    std::os::unix::process::CommandExt::process_group(&mut run, 0);
    demo.daemon = Some(run.spawn()?);
    // `status` says when the daemon has finished starting (the policy is in force).
    let up = wait(Duration::from_secs(20), || {
        demo.counters().is_some_and(|s| s["daemon"].is_number() && s["starting"] == false)
    });
    anyhow::ensure!(up, "the daemon did not come up within 20 s");

    show(&demo, "100.64.0.2", "100.64.0.1", "CGNAT neighbour (expect DROPPED)");
    show(&demo, "192.0.2.2", "192.0.2.1", "non-CGNAT host on the same link (expect passes)");
    print_status(&demo)?;
    if stop.load(Ordering::SeqCst) {
        return Ok(());
    }

    say("adding allow = [\"100.64.0.0/24\"] to the config file (the daemon watches it; SIGHUP does the same): no restart");
    demo.config("\"100.64.0.0/24\"")?;
    let allowed = wait(Duration::from_secs(5), || demo.ping("100.64.0.2", "100.64.0.1"));
    println!("    100.64.0.2 -> 100.64.0.1 ping {} after the reload", verdict(allowed));

    say(&format!("live counters for {seconds} s: each second one ping from 100.64.0.2 and one from 192.0.2.2; Ctrl-C ends"));
    let pid = demo.daemon.as_ref().unwrap().id().to_string();
    demo.config("")?;
    super::run(Command::new("kill").args(["-HUP", &pid]))?;
    let removed = wait(Duration::from_secs(5), || {
        demo.counters().is_some_and(|s| {
            s["rules"].as_array().is_some_and(|r| r.iter().all(|r| r["prefix"] != "100.64.0.0/24"))
        })
    });
    anyhow::ensure!(removed, "the reload did not remove the exemption");
    println!("    (exemption removed again with SIGHUP, so the CGNAT pings are dropped)");
    println!("    {:>4}  {:>12}  {:>12}  {:>16}", "t", "uplink_drop", "lan ping", "cgnat ping");
    let start = Instant::now();
    for tick in 1..=seconds {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let cgnat = demo.ping("100.64.0.2", "100.64.0.1");
        let lan = demo.ping("192.0.2.2", "192.0.2.1");
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if let Some(s) = demo.counters() {
            let c = |name: &str| s["counters"][name].as_u64().unwrap_or(0);
            println!(
                "    {:>3}s  {:>12}  {:>12}  {:>16}",
                start.elapsed().as_secs(),
                c("uplink_drop"),
                verdict(lan),
                verdict(cgnat)
            );
        }
        // One round a second.
        std::thread::sleep((start + Duration::from_secs(tick)).saturating_duration_since(Instant::now()));
    }
    if !stop.load(Ordering::SeqCst) {
        print_status(&demo)?;
    }
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "passes"
    } else {
        "DROPPED"
    }
}

fn show(demo: &Demo, src: &str, dst: &str, what: &str) {
    println!("    {src} -> {dst} ping {}   [{what}]", verdict(demo.ping(src, dst)));
}

fn print_status(demo: &Demo) -> Result<()> {
    say("tailgate status (read from the kernel: pinned maps or iptables-save; no daemon involved)");
    super::run(&mut demo.tailgate(&["status"]))
}

fn say(what: &str) {
    println!("\n==> demo: {what}");
}

fn wait(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}
