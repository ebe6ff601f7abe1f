//! Runs the real `tailgate` binary inside a test namespace with its own pin directory.

use std::{
    cell::RefCell,
    fs,
    os::{fd::AsFd, unix::net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use nix::{
    sched::{setns, CloneFlags},
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use tempfile::TempDir;

use crate::{netns::Netns, wait};

/// The `tailgate` binary of this workspace (built by `cargo xtask test` before the tests),
/// or `$TAILGATE_BIN`.
pub fn binary() -> PathBuf {
    find_binary().unwrap_or_else(|e| panic!("{e}"))
}

/// `$TAILGATE_BIN`, or `tailgate` next to this executable (a binary of `target/<profile>/`,
/// as the benchmark) or one directory up (a test in `target/<profile>/deps/`).
pub fn find_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("TAILGATE_BIN") {
        return Ok(bin.into());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no directory of the executable")?;
    [dir.join("tailgate"), dir.parent().context("no target dir")?.join("tailgate")]
        .into_iter()
        .find(|bin| bin.exists())
        .with_context(|| {
            format!(
                "no tailgate binary next to {}: run `cargo build -p userspace` first (cargo xtask test \
                 does), or set TAILGATE_BIN",
                exe.display()
            )
        })
}

/// A per-test pin directory on bpffs for an instance living in namespace `ns`. On drop,
/// `tailgate cleanup` runs inside that namespace: pins, links and iptables rules go.
pub struct PinDir {
    path: PathBuf,
    netns: String,
}

impl PinDir {
    pub fn new(ns: &Netns) -> Self {
        Self::at(ns, PathBuf::from("/sys/fs/bpf").join(crate::unique("tailgate-test")))
    }

    /// A pin dir at a path of the test's choosing (e.g. one that is not on bpffs).
    pub fn at(ns: &Netns, path: PathBuf) -> Self {
        Self { path, netns: ns.path() }
    }

    /// The run state file tailgate keeps for this instance.
    pub fn run_state(&self) -> PathBuf {
        let name = self
            .path
            .to_string_lossy()
            .trim_matches('/')
            .replace('%', "%25")
            .replace('_', "%5F")
            .replace('/', "_");
        PathBuf::from("/run/tailgate").join(format!("{name}.json"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Ok(mut cmd) = command_in(&self.netns, self, &["cleanup"]) {
            let _ = cmd.output();
        }
    }
}

/// `tailgate status --json` of the instance of `pins` in `ns`; `{"running": false, ...}`
/// when nothing is installed.
pub fn status(ns: &Netns, pins: &PinDir) -> serde_json::Value {
    let out = tailgate(ns, pins, &["status", "--json"]).expect("running tailgate status");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status: {e}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// The live attachments `status` lists, as "hook@target".
pub fn attachments(status: &serde_json::Value) -> Vec<String> {
    status["attachments"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|a| format!("{}@{}", a["hook"].as_str().unwrap(), a["target"].as_str().unwrap()))
                .collect()
        })
        .unwrap_or_default()
}

/// `tailgate --pin-dir DIR ARGS` run in `ns`.
pub fn tailgate(ns: &Netns, pins: &PinDir, args: &[&str]) -> Result<Output> {
    command(ns, pins, args)?.output().context("running tailgate")
}

fn command(ns: &Netns, pins: &PinDir, args: &[&str]) -> Result<Command> {
    command_in(&ns.path(), pins, args)
}

fn command_in(netns_path: &str, pins: &PinDir, args: &[&str]) -> Result<Command> {
    let netns = fs::File::open(netns_path)?;
    // Never a panic here: `PinDir::drop` runs this, also while unwinding.
    let mut cmd = Command::new(find_binary()?);
    cmd.arg("--pin-dir").arg(pins.path()).args(args).env_remove("RUST_LOG");
    // Enter only the network namespace (`ip netns exec` would remount /sys and the pins
    // would not land in the host's bpffs).
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from));
    }
    Ok(cmd)
}

/// utime + stime + cutime + cstime of a process (its own and its reaped children's), in
/// clock ticks.
fn process_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name (which may hold spaces) in parentheses: the state is
    // field 3 of the line, utime..cstime fields 14..17.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<u64> = rest.split_whitespace().skip(11).take(4).map(|f| f.parse().unwrap_or(0)).collect();
    anyhow::ensure!(fields.len() == 4, "short stat of {pid}");
    Ok(fields.iter().sum())
}

/// How to launch a daemon beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Extra environment (`WATCHDOG_USEC`, `TAILGATE_*`).
    pub env: Vec<(String, String)>,
    /// Only these capabilities (numbers, as `linux/capability.h`); `None`: all of root's.
    pub capabilities: Option<Vec<u32>>,
}

/// A running daemon. Stopped with SIGTERM (then SIGKILL) on drop.
///
/// It reports to a notify socket of its own (`NOTIFY_SOCKET`, as under systemd): `READY=1`
/// once the policy is in force and again after every reload, `STATUS=` lines while it
/// starts. Readiness is that signal, never a log line.
pub struct Daemon {
    child: Option<Child>,
    dir: TempDir,
    notify: UnixDatagram,
    /// Every notification received so far, in order.
    received: RefCell<Vec<String>>,
}

impl Daemon {
    /// Writes `config` to a file and starts `tailgate run` on it; returns once the daemon
    /// says the policy is in force.
    pub fn start(ns: &Netns, pins: &PinDir, config: &str) -> Result<Self> {
        Self::start_with(ns, pins, config, &[])
    }

    /// `start` with extra arguments for `tailgate run`.
    pub fn start_with(ns: &Netns, pins: &PinDir, config: &str, args: &[&str]) -> Result<Self> {
        Self::until_ready(Self::spawn(ns, pins, config, args)?)
    }

    /// `start`, allowing the daemon `timeout` to come up (the benchmark's large policies).
    pub fn start_within(ns: &Netns, pins: &PinDir, config: &str, timeout: Duration) -> Result<Self> {
        Self::ready_within(Self::spawn(ns, pins, config, &[])?, timeout)
    }

    /// Waits for a spawned daemon's first `READY=1`; stops it if it exits or never says so.
    fn until_ready(daemon: Self) -> Result<Self> {
        Self::ready_within(daemon, Duration::from_secs(20))
    }

    fn ready_within(mut daemon: Self, timeout: Duration) -> Result<Self> {
        // Polled every millisecond: start times are measured with it.
        let deadline = std::time::Instant::now() + timeout;
        let ready = loop {
            if daemon.readies() > 0 || !daemon.alive() {
                break true;
            }
            if std::time::Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        if !ready || !daemon.alive() {
            let log = daemon.log();
            daemon.stop();
            bail!("daemon did not come up (ready={ready}); its log:\n{log}");
        }
        Ok(daemon)
    }

    /// Starts `tailgate run` and waits for it to exit (for configs it must refuse).
    pub fn run_to_exit(ns: &Netns, pins: &PinDir, config: &str) -> Result<(i32, String)> {
        let mut daemon = Self::spawn(ns, pins, config, &[])?;
        let exited = wait::until(Duration::from_secs(20), || !daemon.alive());
        if !exited {
            daemon.stop();
            bail!("daemon kept running");
        }
        Ok((daemon.exit_code()?, daemon.log()))
    }

    /// Starts `tailgate run` without waiting for anything.
    pub fn spawn(ns: &Netns, pins: &PinDir, config: &str, args: &[&str]) -> Result<Self> {
        Self::spawn_with(ns, pins, config, args, &Launch::default())
    }

    /// `start` as `launch` says (environment, capabilities).
    pub fn start_launched(ns: &Netns, pins: &PinDir, config: &str, launch: &Launch) -> Result<Self> {
        Self::until_ready(Self::spawn_with(ns, pins, config, &[], launch)?)
    }

    fn spawn_with(ns: &Netns, pins: &PinDir, config: &str, args: &[&str], launch: &Launch) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("tailgate.toml");
        fs::write(&config_path, config)?;
        let socket_path = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&socket_path)?;
        notify.set_nonblocking(true)?;
        let log = fs::File::create(dir.path().join("log"))?;
        let mut run = vec!["run", "--config", config_path.to_str().unwrap()];
        run.extend_from_slice(args);
        let mut cmd = command(ns, pins, &run)?;
        cmd.envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(keep) = launch.capabilities.clone() {
            let last: u32 = fs::read_to_string("/proc/sys/kernel/cap_last_cap")?.trim().parse()?;
            // Only these capabilities in the bounding set: a root process execs with
            // exactly them (as systemd's CapabilityBoundingSet= does).
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(move || {
                    for cap in 0..=last {
                        if !keep.contains(&cap)
                            && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .env("NOTIFY_SOCKET", &socket_path)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("spawning tailgate")?;
        Ok(Self { child: Some(child), dir, notify, received: RefCell::new(Vec::new()) })
    }

    /// Every notification so far (`READY=1`, `STATUS=...`, one entry per line).
    pub fn notifications(&self) -> Vec<String> {
        let mut buf = [0u8; 4096];
        let mut received = self.received.borrow_mut();
        while let Ok(n) = self.notify.recv(&mut buf) {
            received.extend(String::from_utf8_lossy(&buf[..n]).lines().map(String::from));
        }
        received.clone()
    }

    /// How many times the daemon said it is ready (start, then once per reload).
    pub fn readies(&self) -> usize {
        self.notifications().iter().filter(|n| *n == "READY=1").count()
    }

    /// SIGHUP, then waits until the daemon has handled it (ready again).
    pub fn reload(&self) -> Result<()> {
        let before = self.readies();
        self.signal(Signal::SIGHUP)?;
        self.wait_ready_after(before)
    }

    /// `reload`, timed from the signal to the daemon's `READY=1` (polled every 0.2 ms),
    /// for the benchmark.
    pub fn timed_reload(&self) -> Result<Duration> {
        self.timed_reload_within(Duration::from_secs(30))
    }

    /// `timed_reload`, allowing the daemon `timeout`.
    pub fn timed_reload_within(&self, timeout: Duration) -> Result<Duration> {
        let before = self.readies();
        let start = std::time::Instant::now();
        self.signal(Signal::SIGHUP)?;
        while self.readies() <= before {
            if start.elapsed() > timeout {
                bail!("the daemon did not report ready again; its log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(start.elapsed())
    }

    /// The daemon's resident memory now and at its peak (`VmRSS`, `VmHWM`), in KiB.
    pub fn memory_kib(&self) -> Result<(u64, u64)> {
        let pid = self.pid().context("not running")?;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> Result<u64> {
            let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name}"))?;
            Ok(line.split_whitespace().nth(1).context("no value")?.parse()?)
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// `memory_kib` once the daemon is done with its last start or reload: the status it
    /// sends after giving freed heap back follows the last `READY=1`.
    pub fn settled_memory_kib(&self) -> Result<(u64, u64)> {
        let settled = || {
            let all = self.notifications();
            let last_ready = all.iter().rposition(|n| n == "READY=1");
            last_ready.is_some_and(|r| all[r..].iter().any(|n| n.starts_with("STATUS=enforcing")))
        };
        if !wait::until(Duration::from_secs(10), settled) {
            bail!("the daemon did not settle after its last reload; its log:\n{}", self.log());
        }
        self.memory_kib()
    }

    /// Waits up to 10 s for a `READY=1` beyond the first `count`.
    pub fn wait_ready_after(&self, count: usize) -> Result<()> {
        if !wait::until(Duration::from_secs(10), || self.readies() > count) {
            bail!("the daemon did not report ready again; its log:\n{}", self.log());
        }
        Ok(())
    }

    /// The exit code once the process has exited (-1 when killed by a signal).
    pub fn exit_code(&mut self) -> Result<i32> {
        Ok(self.child.take().context("not running")?.wait()?.code().unwrap_or(-1))
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("tailgate.toml")
    }

    /// Replaces the config file atomically (write + rename, as editors and config
    /// management do).
    pub fn write_config(&self, config: &str) -> Result<()> {
        let tmp = self.dir.path().join("tailgate.toml.tmp");
        fs::write(&tmp, config)?;
        fs::rename(&tmp, self.config_path())?;
        Ok(())
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.child.as_ref().context("not running")?.id();
        kill(Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits up to 5 s for `text` to appear in the daemon's log; panics with the log if not.
    pub fn wait_for_log(&self, text: &str) {
        let seen = wait::until(Duration::from_secs(5), || self.log().contains(text));
        assert!(seen, "daemon never logged {text:?}; its log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// SIGTERM, timed until the daemon exited (having removed what it installed), for the
    /// benchmark; an error if it takes longer than `timeout` (then it is killed) or fails.
    pub fn timed_stop(&mut self, timeout: Duration) -> Result<Duration> {
        let pid = Pid::from_raw(self.child.as_ref().context("not running")?.id() as i32);
        let start = std::time::Instant::now();
        // On any error the child stays in `self`: `Drop` stops it.
        kill(pid, Signal::SIGTERM)?;
        loop {
            let child = self.child.as_mut().expect("taken only below");
            if let Some(status) = child.try_wait()? {
                self.child = None;
                let took = start.elapsed();
                if !status.success() {
                    bail!("the daemon exited with {status}; its log:\n{}", self.log());
                }
                return Ok(took);
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                bail!("the daemon did not stop within {timeout:?}; its log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// CPU time (user + system) the daemon used so far, with that of the programs it runs
    /// (`iptables-save`/`-restore`): those it waited for (cutime, cstime) and those running
    /// now, from /proc/<pid>/stat.
    pub fn cpu_time(&self) -> Result<Duration> {
        let pid = self.pid().context("not running")?;
        let mut ticks = process_ticks(pid)?;
        let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
            // Gone since the list was read: its time is in cutime by now, or soon.
            ticks += process_ticks(child).unwrap_or(0);
        }
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL. Returns the exit code if it exited.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let mut code = None;
        wait::until(Duration::from_secs(10), || match child.try_wait() {
            Ok(Some(status)) => {
                code = status.code();
                true
            }
            _ => false,
        });
        if code.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        code
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}
