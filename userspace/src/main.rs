use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};
use tailgate::{
    backend::{
        bpf::{self, pins::DEFAULT_PIN_DIR, KernelLog, Pins},
        iptables,
    },
    daemon, explain,
    lock::{self, Lock},
    netdev, runstate, status,
};

/// Overlay gateway datapath: CGNAT source filtering in XDP/TC.
#[derive(Parser)]
#[command(name = "tailgate", version)]
struct Cli {
    /// Directory on bpffs holding this instance's maps and links.
    #[arg(long, global = true, env = "TAILGATE_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load, attach and enforce the config; reload on SIGHUP or file change.
    Run {
        /// TOML config file (TAILGATE_* variables override it).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Kernel-side log level (aya-log); off costs nothing on the packet path.
        #[arg(long, value_enum, default_value_t = KernelLog::Off)]
        kernel_log: KernelLog,
    },
    /// Show attachments, rules and counters from the pinned state.
    Status {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the entries of the flow tables (BPF backend), most recent first.
    Flows {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Detach and unpin everything under the pin dir and remove tailgate's iptables rules
    /// (this network namespace). For leftovers: refused while a daemon runs (stop it
    /// first). Safe to run twice.
    Cleanup {
        /// Remove even while a daemon holds the pin dir or the namespace's iptables rules.
        #[arg(long)]
        force: bool,
    },
    /// What the datapath in force would do with a packet: verdict, the rule and its config
    /// field, mark, NAT, MSS, flow-table state. BPF: the programs run on the packet against
    /// the live policy (copies of the flow tables: nothing live changes); iptables: the
    /// rules evaluated in netfilter's order.
    Explain {
        /// The device the packet arrives on (without --out: the kernel routes it on).
        #[arg(long = "in", value_name = "DEV")]
        input: Option<String>,
        /// The device it leaves by (alone: a packet this host sends).
        #[arg(long = "out", value_name = "DEV")]
        output: Option<String>,
        #[arg(long, value_enum, default_value_t = explain::packet::Proto::Tcp)]
        proto: explain::packet::Proto,
        #[arg(long)]
        src: std::net::IpAddr,
        #[arg(long)]
        dst: std::net::IpAddr,
        /// Source port (ICMP: the echo identifier).
        #[arg(long, default_value_t = 40000)]
        sport: u16,
        /// Destination port (TCP, UDP).
        #[arg(long, default_value_t = 0)]
        dport: u16,
        /// TCP flags, e.g. `syn` or `ack,psh` (default for TCP: syn).
        #[arg(long)]
        flags: Option<explain::packet::Flags>,
        /// The MSS option of a SYN.
        #[arg(long, default_value_t = 1460)]
        mss: u16,
        /// The config to name rules by (iptables: to evaluate); default: the daemon's.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check a config file (and this host's interfaces) without applying it.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    // An empty TAILGATE_PIN_DIR counts as unset, like every other TAILGATE_* variable.
    if std::env::var("TAILGATE_PIN_DIR").is_ok_and(|v| v.trim().is_empty()) {
        std::env::remove_var("TAILGATE_PIN_DIR");
    }
    let cli = Cli::parse();
    // explain prints a report; what it reads on the way (devices, the config) is no news.
    let level = if matches!(cli.command, Command::Explain { .. }) { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            // Kernel records (target tailgate_datapath::*) are already filtered in the kernel
            // by --kernel-log; let whatever level was asked for through.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| format!("{level},tailgate_datapath=trace").into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match execute(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tailgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> Result<ExitCode> {
    let pins = Pins::new(cli.pin_dir);
    match cli.command {
        Command::Run { config, kernel_log } => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(daemon::run(daemon::RunOptions { config, pins, kernel_log }))?;
        }
        Command::Status { json } => match status::read(&pins)? {
            None => {
                if json {
                    println!("{}", serde_json::json!({ "running": false, "pin_dir": pins.root() }));
                } else {
                    println!("tailgate: nothing pinned under {} (not running)", pins.root().display());
                }
                return Ok(ExitCode::from(3));
            }
            Some(s) if json => out(&format!("{}\n", serde_json::to_string_pretty(&s)?)),
            Some(s) => out(&status::render_text(&s)),
        },
        Command::Flows { json } => {
            let flows = status::flows(&pins)?;
            if json {
                out(&format!("{}\n", serde_json::to_string_pretty(&flows)?));
            } else {
                out(&status::render_flows(&flows));
            }
        }
        Command::Cleanup { force } => cleanup(&pins, force)?,
        Command::Explain { input, output, proto, src, dst, sport, dport, flags, mss, config, json } => {
            let tcp = proto == explain::packet::Proto::Tcp;
            let flags = if tcp {
                Some(flags.unwrap_or(explain::packet::Flags { syn: true, ..Default::default() }))
            } else {
                flags
            };
            let packet = explain::packet::Described {
                proto,
                src,
                dst,
                sport,
                dport,
                flags: if tcp {
                    Some(flags.unwrap_or(explain::packet::Flags { syn: true, ..Default::default() }))
                } else {
                    flags
                },
                mss: tcp.then_some(mss),
            };
            let query = explain::Query { packet, input, output, config };
            let report = explain::explain(&pins, &query)?;
            if json {
                out(&format!("{}\n", serde_json::to_string_pretty(&report)?));
            } else {
                out(&explain::render_text(&report));
            }
        }
        Command::Check { config } => {
            let (_, state) = daemon::desired_state(config.as_deref(), netdev::Check::Config)?;
            let tunnel =
                if netdev::interfaces()?.contains_key(&state.tunnel) { "" } else { " (absent for now)" };
            println!(
                "ok: uplinks [{}], tunnel {}{tunnel}, {} inbound and {} forward rules",
                state.uplinks.join(", "),
                state.tunnel,
                state.cgnat.inbound.len(),
                state.cgnat.forward.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Removes what a stopped or killed instance left. Refused while a daemon holds the pin dir
/// (it would be left running with nothing in force) unless `force`.
fn cleanup(pins: &Pins, force: bool) -> Result<()> {
    let instance = match Lock::try_acquire(&lock::instance_path(pins))? {
        Ok(lock) => Some(lock),
        Err(held) if !force => anyhow::bail!(
            "tailgate (PID {}) is running with pin dir {}: stop it instead (it removes what it \
             installed), or use --force",
            held.pid,
            pins.root().display()
        ),
        Err(_) => None,
    };
    pins.remove_all(&bpf::known_maps())?;
    if force {
        iptables::remove_all_unlocked()?;
    } else {
        iptables::remove_all()?;
    }
    // A running daemon's run state is its own (it says what it is; it goes when it stops).
    if instance.is_some() {
        runstate::remove(pins);
    }
    println!(
        "tailgate: cleaned up: nothing left under {}, no tailgate iptables rules or ipset sets",
        pins.root().display()
    );
    Ok(())
}

/// Prints to stdout; a reader that went away (`status | head`) is not an error.
fn out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}
