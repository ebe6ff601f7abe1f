//! Builds the eBPF object (crate `datapath-ebpf`) and hands its path to the userspace crate,
//! which embeds it. The route is the one in the toolchain notes: Debian's cargo and rustc
//! (they ship a prebuilt `core` for bpfel-unknown-none), bpf-linker built against the same
//! LLVM, release profile, BTF. `cargo xtask setup` installs all of it.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const TARGET: &str = "bpfel-unknown-none";

/// Functions of the eBPF object that must stay global (bpf-linker internalizes the rest):
/// the verifier checks a global function once, on its own, instead of once per path of
/// every caller (see `datapath-ebpf/src/cgnat.rs` and `datapath-ebpf/src/mss.rs`).
const GLOBAL_FUNCTIONS: [&str; 9] = [
    "tg_cgnat_in4",
    "tg_cgnat_in6",
    "tg_cgnat_fwd4",
    "tg_cgnat_fwd6",
    "tg_slot_in4",
    "tg_slot_in6",
    "tg_slot_fwd4",
    "tg_slot_fwd6",
    "tg_mss_option",
];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    for path in ["datapath-ebpf/src", "datapath-ebpf/Cargo.toml", "abi/src", "abi/Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
    println!("cargo:rerun-if-env-changed=TAILGATE_BPF_OBJECT");

    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let object = out_dir.join("tailgate-datapath.o");
    let source = match env::var_os("TAILGATE_BPF_OBJECT") {
        // A prebuilt object (packaging).
        Some(path) => PathBuf::from(path),
        None => build(&root),
    };
    std::fs::copy(&source, &object)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", source.display(), object.display()));
}

fn build(root: &Path) -> PathBuf {
    for tool in [DEBIAN_CARGO, DEBIAN_RUSTC] {
        if !Path::new(tool).exists() {
            panic!(
                "{tool} is missing: the eBPF object needs Debian's Rust toolchain; run `cargo xtask setup`"
            );
        }
    }
    let target_dir = root.join("target/bpf");
    let mut cmd = Command::new(DEBIAN_CARGO);
    cmd.current_dir(root)
        .args(["build", "--release", "--locked", "-p", "datapath-ebpf", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's variables (rustflags, clippy's wrapper, target dir, ...) must not
    // leak into the nested one.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key == "CARGO_HOME" {
            continue;
        }
        if key.starts_with("CARGO_") || key.starts_with("RUSTC") || key == "RUSTFLAGS" || key == "RUSTDOC" {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.env("RUSTC", DEBIAN_RUSTC)
        // aya-ebpf uses #![feature(asm_experimental_arch)]; allow it for that crate only.
        .env("RUSTC_BOOTSTRAP", "aya_ebpf")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!(
                "-Cdebuginfo=2\x1f-Clink-arg=--btf\x1f-Clink-arg=--export={}",
                GLOBAL_FUNCTIONS.join(",")
            ),
        );
    // bpf-linker lives in cargo's bin directory.
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var("HOME").unwrap_or_default()).join(".cargo"));
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![cargo_home.join("bin")];
    paths.extend(env::split_paths(&path));
    cmd.env("PATH", env::join_paths(paths).unwrap());

    let status = cmd.status().unwrap_or_else(|e| panic!("running {DEBIAN_CARGO}: {e}"));
    if !status.success() {
        panic!("building the eBPF object failed ({status}); `cargo xtask setup` installs the toolchain");
    }
    target_dir.join(TARGET).join("release/tailgate-datapath")
}
