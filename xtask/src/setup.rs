//! `cargo xtask setup`: installs what the build and the tests need, and nothing when all of
//! it is there. The route is the one in shared/notes/ebpf-toolchain.md: Debian's rustc-web
//! (with a prebuilt `core` for bpfel-unknown-none) and bpf-linker built against the same
//! LLVM major.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// Debian packages: the eBPF toolchain, and the tools the tests and the demo run.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "bpftool",
    "iproute2",
    "iputils-ping",
    "iptables",
    // Kernel sets for the iptables backend's prefix lists.
    "ipset",
    "procps",
    "util-linux",
    // systemd-analyze, for the unit's tests.
    "systemd",
    // A virtual environment for the Python tools below.
    "python3-venv",
];
/// Python tools the tests run, from PyPI, in a virtual environment of their own: the
/// Kubernetes API schemas, offline (the manifests' test).
const PYTHON_TOOLS: &[&str] = &["kubernetes-validate==1.37.0"];
/// Where (`tests/kubernetes.rs` runs `bin/kubernetes-validate` from there).
pub const PYTHON_VENV: &str = "/var/cache/tailgate-tests/venv";
const BPF_LINKER_VERSION: &str = "0.13.0";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";

pub fn run() -> Result<()> {
    apt_install(PACKAGES)?;
    let llvm = llvm_major()?;
    apt_install(&[&format!("llvm-{llvm}-dev")])?;
    bpf_linker(llvm)?;
    rust_components()?;
    python_tools()?;
    println!("xtask setup: toolchain ready (Debian rustc LLVM {llvm}, bpf-linker {BPF_LINKER_VERSION})");
    Ok(())
}

fn python_tools() -> Result<()> {
    let venv = Path::new(PYTHON_VENV);
    if venv.join("bin/kubernetes-validate").exists() {
        return Ok(());
    }
    println!("xtask setup: installing {} into {PYTHON_VENV}", PYTHON_TOOLS.join(" "));
    super::run(Command::new("/usr/bin/python3").args(["-m", "venv"]).arg(venv))?;
    super::run(Command::new(venv.join("bin/pip")).args(["install", "-q"]).args(PYTHON_TOOLS))
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask setup: installing Debian packages: {}", missing.join(" "));
    if !super::nix_is_root() {
        bail!("installing {} needs root", missing.join(" "));
    }
    super::run(Command::new("apt-get").args(["update", "-q"]))?;
    super::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The LLVM major version Debian's rustc uses (bpf-linker must match it).
fn llvm_major() -> Result<u32> {
    let out = Command::new(DEBIAN_RUSTC).arg("-vV").output().context("running /usr/bin/rustc -vV")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("no LLVM version in `rustc -vV`:\n{text}"))
}

fn cargo_bin() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    home.join("bin")
}

/// bpf-linker at the pinned version, dynamically linked against `libLLVM.so.<llvm>`.
fn bpf_linker(llvm: u32) -> Result<()> {
    let linker = cargo_bin().join("bpf-linker");
    let version_ok = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    let llvm_ok = Command::new("ldd")
        .arg(&linker)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("libLLVM.so.{llvm}")))
        .unwrap_or(false);
    if version_ok && llvm_ok {
        return Ok(());
    }
    println!("xtask setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm} (about a minute)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    super::run(
        Command::new(cargo)
            .args(["install", "--locked", "--force", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
            .args(["--no-default-features", "--features", &format!("llvm-{llvm}")])
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{llvm}")),
    )
}

fn rust_components() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for (sub, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        let ok = Command::new(&cargo)
            .args([sub, "--version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            println!("xtask setup: adding rustup component {component}");
            super::run(Command::new("rustup").args(["component", "add", component]))
                .with_context(|| format!("`cargo {sub}` is missing and rustup could not add {component}"))?;
        }
    }
    Ok(())
}
