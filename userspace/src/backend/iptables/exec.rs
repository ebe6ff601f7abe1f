//! Running iptables: which variant (nft or legacy), which families and tables work, and
//! the save/restore calls. One `iptables-restore --noflush` per table and family.

use std::{
    collections::BTreeSet,
    io::Write,
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
};

use anyhow::{bail, Context, Result};

use super::table::{Family, Table};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    Nft,
    Legacy,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Nft => "nft",
            Variant::Legacy => "legacy",
        }
    }
}

/// Which (family, table) pairs this host's netfilter offers, from the probe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Available(BTreeSet<(Family, Table)>);

impl Available {
    pub fn has(&self, family: Family, table: Table) -> bool {
        self.0.contains(&(family, table))
    }

    /// Every pair, for tests.
    pub fn all() -> Self {
        Self([Family::V4, Family::V6].into_iter().flat_map(|f| Table::ALL.map(|t| (f, t))).collect())
    }

    pub fn without(mut self, family: Family, table: Table) -> Self {
        self.0.remove(&(family, table));
        self
    }

    pub fn iter(&self) -> impl Iterator<Item = (Family, Table)> + '_ {
        self.0.iter().copied()
    }
}

/// Runs `*-save` and `*-restore`: the real binaries, or a stand-in in tests.
pub trait Runner: Send + Sync {
    /// `iptables-save [-c] -t <table>` for one family.
    fn save(&self, family: Family, table: Table, counters: bool) -> Result<String>;
    /// `iptables-save` of every table of one family, in one exec.
    fn save_all(&self, family: Family) -> Result<String>;
    /// `iptables-restore --noflush` with `payload`, atomic for the table.
    fn restore(&self, family: Family, payload: &str) -> Result<()>;
    /// A number that changes whenever any table changes, where the variant has one (nft:
    /// the ruleset generation); `None`: the tables must be read to tell.
    fn generation(&self) -> Option<Result<u32>>;
}

/// The iptables of this host (in the current network namespace).
#[derive(Clone)]
pub struct Iptables {
    pub variant: Variant,
    pub available: Available,
    runner: Arc<dyn Runner>,
}

impl std::fmt::Debug for Iptables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iptables")
            .field("variant", &self.variant)
            .field("available", &self.available)
            .finish()
    }
}

/// The installed binaries of one variant.
struct Binaries(Variant);

fn binary(family: Family, variant: Variant, tool: &str) -> String {
    let base = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    format!("{base}-{}{tool}", variant.name())
}

/// Whether a system binary is installed.
pub(super) fn exists(bin: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].iter().any(|dir| Path::new(dir).join(bin).exists())
}

impl Iptables {
    /// Picks the variant (`forced`, or the one that already holds rules, nft on a tie) and
    /// probes every table of both families: IPv4 filter must work; the rest is used where
    /// it does (ip6tables installed, kernel IPv6, the table usable).
    pub fn probe(forced: Option<Variant>) -> Result<Self> {
        let variant = match forced {
            Some(v) => v,
            None => detect_variant(),
        };
        if !exists(&binary(Family::V4, variant, "-restore")) {
            bail!("{} not found (install the iptables package)", binary(Family::V4, variant, "-restore"));
        }
        let mut ip = Self::with_runner(variant, Available::default(), Arc::new(Binaries(variant)));
        ip.save(Family::V4, Table::Filter, false).context("IPv4 filter table unusable")?;
        let v6 = if !exists(&binary(Family::V6, variant, "-restore")) {
            tracing::info!("ip6tables ({}) not found: IPv6 rules skipped", variant.name());
            false
        } else if !Path::new("/proc/net/if_inet6").exists() {
            tracing::info!("kernel has no IPv6: IPv6 rules skipped");
            false
        } else {
            true
        };
        for family in [Family::V4, Family::V6] {
            if family == Family::V6 && !v6 {
                continue;
            }
            for table in Table::ALL {
                match ip.save(family, table, false) {
                    Ok(_) => {
                        ip.available.0.insert((family, table));
                    }
                    Err(e) => tracing::info!(
                        "{} {table} table unusable ({e:#}): its rules are skipped",
                        super::family_name(family)
                    ),
                }
            }
        }
        Ok(ip)
    }

    /// Like `probe` for a given variant, without log lines (cleanup, status). A legacy
    /// variant with no table in this namespace holds nothing of tailgate's and is not
    /// touched: reading a legacy table creates it, and iptables-nft then warns about it.
    pub fn probe_quiet(variant: Variant) -> Result<Self> {
        if !exists(&binary(Family::V4, variant, "-restore")) {
            bail!("not installed");
        }
        if variant == Variant::Legacy && !legacy_in_use() {
            bail!("no legacy tables in this network namespace");
        }
        let mut ip = Self::with_runner(variant, Available::default(), Arc::new(Binaries(variant)));
        let v6 = exists(&binary(Family::V6, variant, "-restore")) && Path::new("/proc/net/if_inet6").exists();
        for family in [Family::V4, Family::V6] {
            for table in Table::ALL {
                if (family == Family::V4 || v6) && ip.save(family, table, false).is_ok() {
                    ip.available.0.insert((family, table));
                }
            }
        }
        Ok(ip)
    }

    /// An `Iptables` that runs `runner` (tests: a stand-in for the binaries).
    pub fn with_runner(variant: Variant, available: Available, runner: Arc<dyn Runner>) -> Self {
        Self { variant, available, runner }
    }

    /// The (family, table) pairs this host can use.
    pub fn tables(&self) -> impl Iterator<Item = (Family, Table)> + '_ {
        self.available.iter()
    }

    /// `iptables-save [-c] -t <table>` for one family.
    pub fn save(&self, family: Family, table: Table, counters: bool) -> Result<String> {
        self.runner.save(family, table, counters)
    }

    /// `iptables-save` of every table of one family, in one exec.
    pub fn save_all(&self, family: Family) -> Result<String> {
        self.runner.save_all(family)
    }

    /// `iptables-restore --noflush` with `payload`, atomic for the table.
    pub fn restore(&self, family: Family, payload: &str) -> Result<()> {
        self.runner.restore(family, payload)
    }

    /// See `Runner::generation`.
    pub fn generation(&self) -> Option<Result<u32>> {
        self.runner.generation()
    }
}

impl Runner for Binaries {
    fn save(&self, family: Family, table: Table, counters: bool) -> Result<String> {
        let bin = binary(family, self.0, "-save");
        let mut cmd = Command::new(&bin);
        cmd.args(["-t", table.name()]);
        if counters {
            cmd.arg("-c");
        }
        let out = cmd.output().with_context(|| format!("running {bin}"))?;
        if !out.status.success() {
            bail!("{bin} -t {table}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn save_all(&self, family: Family) -> Result<String> {
        let bin = binary(family, self.0, "-save");
        let out = Command::new(&bin).output().with_context(|| format!("running {bin}"))?;
        if !out.status.success() {
            bail!("{bin}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn generation(&self) -> Option<Result<u32>> {
        (self.0 == Variant::Nft).then(super::generation::nft)
    }

    fn restore(&self, family: Family, payload: &str) -> Result<()> {
        let bin = binary(family, self.0, "-restore");
        let err = fed(Command::new(&bin).args(["-w", "5", "--noflush"]), payload)?;
        if let Some(err) = err {
            bail!("{bin} --noflush failed: {err}\npayload:\n{payload}");
        }
        Ok(())
    }
}

/// Runs `cmd` with `payload` on its standard input; `Some(stderr)` when it failed. A tool
/// that stops reading at its first bad line (a write error here) reports why itself.
pub(super) fn fed(cmd: &mut Command, payload: &str) -> Result<Option<String>> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", cmd.get_program().to_string_lossy()))?;
    let written = child.stdin.take().expect("piped").write_all(payload.as_bytes());
    let out = child.wait_with_output()?;
    Ok((!out.status.success() || written.is_err())
        .then(|| String::from_utf8_lossy(&out.stderr).trim().to_string()))
}

/// The variant whose tables already hold rules (as kube-proxy's iptables wrapper decides);
/// nft when neither or both equally do.
pub fn detect_variant() -> Variant {
    let rules = |variant: Variant| -> usize {
        if variant == Variant::Legacy && !legacy_in_use() {
            return 0;
        }
        [Family::V4, Family::V6]
            .iter()
            .filter_map(|f| Command::new(binary(*f, variant, "-save")).stderr(Stdio::null()).output().ok())
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with("-A")).count())
            .sum()
    };
    if rules(Variant::Legacy) > rules(Variant::Nft) {
        Variant::Legacy
    } else {
        Variant::Nft
    }
}

/// Whether any iptables-legacy table exists in this network namespace (the kernel lists
/// them in /proc/net/ip_tables_names and ip6_tables_names).
fn legacy_in_use() -> bool {
    ["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"]
        .iter()
        .any(|path| std::fs::read_to_string(path).is_ok_and(|names| !names.trim().is_empty()))
}
