//! Masquerade in the BPF backend (`datapath-ebpf/src/masquerade.rs`): the stage switch, the
//! mark it keys on (`subnet_routes`) and the port range in `SETTINGS`; the check that the
//! range stays clear of the host's own ephemeral ports.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tailgate_abi::settings::{stage, Settings};

use crate::policy::DesiredState;

/// The host's ephemeral ports (per network namespace).
pub const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

pub fn fill(state: &DesiredState, settings: &mut Settings) {
    if state.subnet_routes.masquerade {
        settings.stages |= stage::MASQUERADE;
        settings.nat_ports = state.nat.ports;
    }
}

/// Refuses a port range the host's own connections may use: a translated flow (the
/// masquerade's, the egress proxy's) and a host socket with the same tuple would take each
/// other's replies. (IPv6 shares the IPv4 sysctl.) `root` is `/` except in tests.
pub fn check_ports(state: &DesiredState, root: &Path) -> Result<()> {
    if !state.subnet_routes.masquerade && state.proxy.egress.is_none() {
        return Ok(());
    }
    let path = root.join(LOCAL_PORT_RANGE.trim_start_matches('/'));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {LOCAL_PORT_RANGE}"))?;
    let mut words = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(low)), Some(Ok(high))) = (words.next(), words.next()) else {
        bail!("{LOCAL_PORT_RANGE}: cannot read {text:?}");
    };
    let [first, last] = state.nat.ports;
    if first <= high && low <= last {
        bail!(
            "nat.ports {first}-{last} overlaps the host's ephemeral ports {low}-{high} \
             (net.ipv4.ip_local_port_range): translated flows could collide with the host's own \
             connections; choose a range outside it (e.g. nat.ports = \"{}-65535\") or narrow the sysctl",
            u32::from(high) + 1
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{config::Config, policy};

    fn state(toml: &str) -> DesiredState {
        policy::compile(&Config::parse(toml, &HashMap::new()).unwrap(), Default::default())
    }

    fn root(range: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCAL_PORT_RANGE.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, range).unwrap();
        dir
    }

    #[test]
    fn the_range_stays_clear_of_the_hosts_ports() {
        let linux_default = root("32768\t60999\n");
        check_ports(&state(""), linux_default.path()).unwrap();
        let e = check_ports(&state("[nat]\nports = \"60000-65535\""), linux_default.path()).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("nat.ports 60000-65535") && e.contains("32768-60999") && e.contains("61000"),
            "{e}"
        );
        // Not masquerading: nothing to check.
        check_ports(
            &state("[subnet_routes]\nmasquerade = false\n[nat]\nports = \"60000-65535\""),
            linux_default.path(),
        )
        .unwrap();
        let wide = root("1024 65535\n");
        assert!(check_ports(&state(""), wide.path()).is_err());
    }

    #[test]
    fn settings_carry_the_switch_and_the_ports() {
        let mut settings = Settings::default();
        fill(&state("[nat]\nports = \"62000-63999\""), &mut settings);
        assert_eq!(
            (settings.stages & stage::MASQUERADE, settings.nat_ports),
            (stage::MASQUERADE, [62_000, 63_999])
        );
        let mut off = Settings::default();
        fill(&state("[subnet_routes]\nmasquerade = false"), &mut off);
        assert_eq!(off, Settings::default());
    }
}
