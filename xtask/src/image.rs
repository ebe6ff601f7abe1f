//! `cargo xtask image`: a container image built without a container registry — a Debian
//! root filesystem made from Debian packages (mmdebstrap: the essential set, iptables,
//! `mount` for the bpffs init container) plus the release binary and the sample config —
//! checked by running `tailgate --version`, `tailgate check` and `iptables --version` inside
//! it (a chroot), written as a tarball and, where podman is installed, imported as
//! `localhost/tailgate:<version>` with its entrypoint.

use std::{fs, os::unix::fs::PermissionsExt, path::Path, process::Command};

use anyhow::{bail, Context, Result};

/// The Debian release the image is built from (the build machine's: the binary links its
/// glibc).
const SUITE: &str = "bookworm";
/// What the image holds besides Debian's essential packages.
const INCLUDE: &str = "iptables,mount";

pub fn run() -> Result<()> {
    super::setup::apt_install(&["mmdebstrap"])?;
    super::build(true)?;
    let root = super::root();
    let binary = root.join("target/release/tailgate");
    let version = output(Command::new(&binary).arg("--version"))?;
    let tag = version.split_whitespace().last().context("no version in `tailgate --version`")?.to_string();
    let dir = root.join("target/image");
    let rootfs = dir.join("rootfs");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir)?;
    super::step(&format!("Debian {SUITE} root filesystem (mmdebstrap, essential + {INCLUDE})"));
    super::run(
        Command::new("mmdebstrap")
            .args([
                "--variant=essential",
                &format!("--include={INCLUDE}"),
                "--mode=root",
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                SUITE,
            ])
            .arg(&rootfs),
    )?;
    install(&binary, &rootfs.join("usr/local/bin/tailgate"), 0o755)?;
    install(&root.join("deploy/tailgate.toml"), &rootfs.join("etc/tailgate/tailgate.toml"), 0o644)?;

    super::step("checks inside the image (chroot)");
    let inside = |args: &[&str]| output(Command::new("chroot").arg(&rootfs).args(args));
    let got = inside(&["/usr/local/bin/tailgate", "--version"])?;
    if got.trim() != version.trim() {
        bail!("tailgate --version in the image: {got:?}, built {version:?}");
    }
    println!("{}", got.trim());
    println!(
        "{}",
        inside(&["/usr/local/bin/tailgate", "check", "--config", "/etc/tailgate/tailgate.toml"])?.trim()
    );
    println!("{}", inside(&["iptables", "--version"])?.trim());

    let tarball = dir.join(format!("tailgate-{tag}.tar"));
    super::run(
        Command::new("tar").arg("-C").arg(&rootfs).args(["--numeric-owner", "-cf"]).arg(&tarball).arg("."),
    )?;
    let size = fs::metadata(&tarball)?.len();
    println!("xtask image: {} ({:.0} MiB)", tarball.display(), size as f64 / (1 << 20) as f64);
    let name = format!("localhost/tailgate:{tag}");
    let import = |cmd: &mut Command| {
        cmd.arg("import")
            .args(["--change", "ENTRYPOINT [\"/usr/local/bin/tailgate\"]"])
            .args(["--change", "CMD [\"run\", \"--config\", \"/etc/tailgate/tailgate.toml\"]"])
            .arg(&tarball)
            .arg(&name);
    };
    if which("podman") {
        let mut cmd = Command::new("podman");
        import(&mut cmd);
        super::run(&mut cmd)?;
        println!("xtask image: imported as {name}");
    } else {
        println!(
            "xtask image: import it with podman (or `docker import` with the same --change options):\n  \
             podman import --change 'ENTRYPOINT [\"/usr/local/bin/tailgate\"]' \
             --change 'CMD [\"run\", \"--config\", \"/etc/tailgate/tailgate.toml\"]' {} {name}",
            tarball.display()
        );
    }
    Ok(())
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    fs::create_dir_all(to.parent().context("a path with a parent")?)?;
    fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}
