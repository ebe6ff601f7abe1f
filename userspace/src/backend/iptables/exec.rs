//! Running iptables: which variant (nft or legacy), which families and tables work, and
//! the save/restore calls. One `iptables-restore --noflush` per table and family.

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use super::{cgnat::Available, table::Family};

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

/// The iptables of this host (in the current network namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Iptables {
    pub variant: Variant,
    pub available: Available,
}

fn binary(family: Family, variant: Variant, tool: &str) -> String {
    let base = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    format!("{base}-{}{tool}", variant.name())
}

fn exists(bin: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].iter().any(|dir| Path::new(dir).join(bin).exists())
}

impl Iptables {
    /// Picks the variant (`forced`, or the one that already holds rules, nft on a tie) and
    /// probes IPv6: ip6tables, kernel IPv6, a usable filter table and, separately, nat.
    pub fn probe(forced: Option<Variant>) -> Result<Self> {
        let variant = match forced {
            Some(v) => v,
            None => detect_variant(),
        };
        if !exists(&binary(Family::V4, variant, "-restore")) {
            bail!("{} not found (install the iptables package)", binary(Family::V4, variant, "-restore"));
        }
        let ip = Self { variant, available: Available { v6_filter: false, v6_nat: false } };
        for table in ["filter", "nat"] {
            ip.save(Family::V4, table, false).with_context(|| format!("IPv4 {table} table unusable"))?;
        }
        let v6_filter = if !exists(&binary(Family::V6, variant, "-restore")) {
            tracing::info!("ip6tables ({}) not found: IPv6 rules skipped", variant.name());
            false
        } else if !Path::new("/proc/net/if_inet6").exists() {
            tracing::info!("kernel has no IPv6: IPv6 rules skipped");
            false
        } else if let Err(e) = ip.save(Family::V6, "filter", false) {
            tracing::info!("IPv6 filter table unusable ({e:#}): IPv6 rules skipped");
            false
        } else {
            true
        };
        let v6_nat = v6_filter
            && match ip.save(Family::V6, "nat", false) {
                Ok(_) => true,
                Err(e) => {
                    tracing::info!("IPv6 nat table unusable ({e:#}): IPv6 masquerade skipped");
                    false
                }
            };
        Ok(Self { variant, available: Available { v6_filter, v6_nat } })
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
        let ip = Self { variant, available: Available { v6_filter: false, v6_nat: false } };
        let v6 = exists(&binary(Family::V6, variant, "-restore")) && Path::new("/proc/net/if_inet6").exists();
        let v6_filter = v6 && ip.save(Family::V6, "filter", false).is_ok();
        let v6_nat = v6_filter && ip.save(Family::V6, "nat", false).is_ok();
        Ok(Self { variant, available: Available { v6_filter, v6_nat } })
    }

    /// The (family, table) pairs this host can use: IPv4 filter and nat always, IPv6 as the
    /// probe found.
    pub fn tables(&self) -> impl Iterator<Item = (Family, &'static str)> + '_ {
        [(Family::V4, "filter"), (Family::V4, "nat"), (Family::V6, "filter"), (Family::V6, "nat")]
            .into_iter()
            .filter(|(family, table)| match (family, *table) {
                (Family::V4, _) => true,
                (Family::V6, "filter") => self.available.v6_filter,
                (Family::V6, _) => self.available.v6_nat,
            })
    }

    /// `iptables-save [-c] -t <table>` for one family.
    pub fn save(&self, family: Family, table: &str, counters: bool) -> Result<String> {
        let bin = binary(family, self.variant, "-save");
        let mut cmd = Command::new(&bin);
        cmd.args(["-t", table]);
        if counters {
            cmd.arg("-c");
        }
        let out = cmd.output().with_context(|| format!("running {bin}"))?;
        if !out.status.success() {
            bail!("{bin} -t {table}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `iptables-restore --noflush` with `payload`, atomic for the table.
    pub fn restore(&self, family: Family, payload: &str) -> Result<()> {
        let bin = binary(family, self.variant, "-restore");
        let mut child = Command::new(&bin)
            .args(["-w", "5", "--noflush"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {bin}"))?;
        child.stdin.take().expect("piped").write_all(payload.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{bin} --noflush failed: {}\npayload:\n{payload}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
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
