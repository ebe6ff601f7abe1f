//! Developer commands: `cargo xtask setup | build | test | demo | bench | fuzz | image`.

mod demo;
mod image;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks (Debian packages, bpf-linker). Idempotent.
    Setup,
    /// Build the eBPF object and the `tailgate` binary that embeds it.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// setup + build + fmt check + clippy (-D warnings) + every test. Needs root.
    Test,
    /// setup + build, then a throwaway topology in namespaces with the daemon on it.
    Demo {
        /// How long to run the live-counter traffic phase.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// bpf, iptables or auto.
        #[arg(long, default_value = "bpf")]
        backend: String,
    },
    /// Single-packet cost (BPF_PROG_TEST_RUN), real-traffic cost over veth, reload cost and
    /// daemon memory. Needs root.
    Bench,
    /// The differential test at length: random policies and packets (valid and malformed)
    /// through the kernel programs and the reference model; packets/s, what the cases
    /// reached, the shrunk case on a mismatch. Needs root.
    Fuzz {
        /// Random policies to try.
        #[arg(long, default_value_t = 100_000)]
        cases: u64,
        /// Random packets per policy, at most.
        #[arg(long, default_value_t = 32)]
        packets: u64,
    },
    /// A container image from Debian packages and the release binary (no registry),
    /// checked inside (chroot); imported with podman where installed. Needs root.
    Image,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::Build { release } => {
            setup::run()?;
            build(release)
        }
        Cmd::Test => test(),
        Cmd::Fuzz { cases, packets } => {
            setup::run()?;
            require_root("fuzz")?;
            build(false)?;
            let (cases, packets) = (cases.to_string(), packets.to_string());
            cargo(&[
                "run",
                "--release",
                "--locked",
                "-p",
                "tailgate-tests",
                "--bin",
                "tailgate-fuzz",
                "--",
                "--cases",
                &cases,
                "--packets",
                &packets,
            ])
        }
        Cmd::Image => {
            setup::run()?;
            require_root("image")?;
            image::run()
        }
        Cmd::Demo { seconds, backend } => {
            setup::run()?;
            build(false)?;
            demo::run(seconds, &backend)
        }
        Cmd::Bench => {
            setup::run()?;
            require_root("bench")?;
            // The daemon rows run the release binary.
            build(true)?;
            std::env::set_var("TAILGATE_BIN", root().join("target/release/tailgate"));
            cargo(&["run", "--release", "--locked", "-p", "tailgate-tests", "--bin", "tailgate-bench"])
        }
    }
}

fn build(release: bool) -> Result<()> {
    let mut args = vec!["build", "--locked", "-p", "userspace"];
    if release {
        args.push("--release");
    }
    cargo(&args)?;
    let profile = if release { "release" } else { "debug" };
    println!("xtask: built {}", root().join("target").join(profile).join("tailgate").display());
    Ok(())
}

fn test() -> Result<()> {
    setup::run()?;
    require_root("test")?;
    step("build");
    cargo(&["build", "--workspace", "--all-targets", "--locked"])?;
    step("fmt");
    cargo(&["fmt", "--all", "--", "--check"])?;
    step("clippy");
    cargo(&["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"])?;
    step("tests: unit, packet (BPF_PROG_TEST_RUN), namespace scenarios");
    cargo(&["test", "--workspace", "--locked"])
}

fn require_root(what: &str) -> Result<()> {
    if !nix_is_root() {
        bail!("`cargo xtask {what}` loads BPF programs and creates network namespaces: run it as root");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn step(what: &str) {
    println!("\n==> xtask: {what}");
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(args).current_dir(root()))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
