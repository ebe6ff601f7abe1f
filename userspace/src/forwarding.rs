//! IP forwarding for services: a service's connections are forwarded from the tunnel to its
//! backends, so the gateway must forward. As the reference's container boot does for its
//! proxies: read the sysctl first, write it only when it is off, and say clearly what to do
//! when it cannot be written (a container whose /proc/sys is read-only).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::policy::{services, DesiredState};

pub const IPV4: &str = "/proc/sys/net/ipv4/ip_forward";
pub const IPV6: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// Turns forwarding on for the families `state`'s services and proxies use; returns
/// the sysctls it turned on. `root` is `/` except in tests.
pub fn ensure(state: &DesiredState, root: &Path) -> Result<Vec<&'static str>> {
    let mut wanted = Vec::new();
    let proxies = [state.proxy.ingress.map(|i| i.to), state.proxy.egress.as_ref().map(|e| e.to)];
    let proxy = |v4: bool| proxies.iter().flatten().any(|ip| ip.is_ipv4() == v4);
    if services::any_v4(&state.services) || proxy(true) {
        wanted.push(IPV4);
    }
    if services::any_v6(&state.services) || proxy(false) {
        wanted.push(IPV6);
    }
    let mut turned_on = Vec::new();
    for key in wanted {
        let path: PathBuf = root.join(key.trim_start_matches('/'));
        let current = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("reading {key}: {e}"))?;
        if current.trim() == "1" {
            continue;
        }
        if let Err(e) = std::fs::write(&path, "1\n") {
            let name = key.trim_start_matches("/proc/sys/").replace('/', ".");
            bail!(
                "[[service]] and [proxy] need IP forwarding, and {name} is {} and cannot be written here ({e}); \
                 set it on the host or in the pod's securityContext sysctls (e.g. `sysctl -w {name}=1`)",
                current.trim()
            );
        }
        turned_on.push(key);
    }
    Ok(turned_on)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{config::Config, policy};

    fn state(toml: &str) -> DesiredState {
        policy::compile(&Config::parse(toml, &HashMap::new()).unwrap(), Default::default())
    }

    fn proc(v4: &str, v6: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (key, value) in [(IPV4, v4), (IPV6, v6)] {
            let path = dir.path().join(key.trim_start_matches('/'));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, value).unwrap();
        }
        dir
    }

    fn read(root: &Path, key: &str) -> String {
        std::fs::read_to_string(root.join(key.trim_start_matches('/'))).unwrap().trim().to_string()
    }

    const V4_SERVICE: &str = "[[service]]\nlisten = \"100.101.1.1:80\"\nbackends = [\"192.0.2.1:80\"]";

    #[test]
    fn only_the_families_services_use_and_only_when_off() {
        let root = proc("0\n", "0\n");
        assert_eq!(ensure(&state(""), root.path()).unwrap(), Vec::<&str>::new());
        assert_eq!(ensure(&state(V4_SERVICE), root.path()).unwrap(), [IPV4]);
        assert_eq!((read(root.path(), IPV4), read(root.path(), IPV6)), ("1".into(), "0".into()));
        // Already on: not written again.
        assert!(ensure(&state(V4_SERVICE), root.path()).unwrap().is_empty());
    }

    #[test]
    fn a_sysctl_that_cannot_be_written_is_a_clear_error() {
        let root = proc("0\n", "0\n");
        // A file that reads but refuses writes even for root, as a read-only /proc/sys does.
        let path = root.path().join(IPV4.trim_start_matches('/'));
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/proc/version", &path).unwrap();
        let err = ensure(&state(V4_SERVICE), root.path()).unwrap_err().to_string();
        assert!(err.contains("net.ipv4.ip_forward is Linux version"), "{err}");
        assert!(err.contains("cannot be written here"), "{err}");
    }
}
