//! The Kubernetes manifests (`deploy/kubernetes/`): valid against the Kubernetes API
//! schemas (offline, `kubernetes-validate --strict`, installed by `cargo xtask setup`), and
//! the validator catches a broken one; the configs they carry are valid tailgate configs;
//! the DaemonSet grants the systemd unit's capabilities and no others.

use std::{collections::HashMap, path::PathBuf, process::Command};

const VALIDATOR: &str = "/var/cache/tailgate-tests/venv/bin/kubernetes-validate";
/// The oldest Kubernetes the manifests are for.
const KUBERNETES: &str = "1.29.0";

fn manifests() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    files
}

fn validate(files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(VALIDATOR)
        .args(["--strict", "-k", KUBERNETES])
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("running {VALIDATOR} (installed by `cargo xtask setup`): {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn the_manifests_match_the_kubernetes_schemas() {
    let files = manifests();
    let (ok, text) = validate(&files);
    assert!(ok, "{text}");
    for kind in ["daemonset/tailgate", "configmap/tailgate", "statefulset/db-proxy", "service/db-proxy"] {
        assert!(text.contains(&format!("passed for resource {kind}")), "{kind} not validated: {text}");
    }
    // The validator is not a rubber stamp: an unknown field, and a value of the wrong kind.
    let dir = tempfile::tempdir().unwrap();
    let daemonset =
        std::fs::read_to_string(files.iter().find(|f| f.ends_with("daemonset.yaml")).unwrap()).unwrap();
    for (from, to) in [
        ("hostNetwork: true", "hostNetwork: true\n      hostNetworking: true"),
        ("maxUnavailable: 1", "maxUnavailable: [1]"),
    ] {
        let broken = dir.path().join("broken.yaml");
        std::fs::write(&broken, daemonset.replace(from, to)).unwrap();
        let (ok, text) = validate(&[broken]);
        assert!(!ok, "{to:?} passed: {text}");
    }
}

/// The `tailgate.toml` of every ConfigMap (a block scalar), by ConfigMap name.
fn configs() -> HashMap<String, String> {
    let mut found = HashMap::new();
    for file in manifests() {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in text.split("\n---\n") {
            if !doc.contains("kind: ConfigMap") {
                continue;
            }
            let name = doc.lines().find_map(|l| l.trim().strip_prefix("name: ")).unwrap().to_string();
            let mut lines =
                doc.lines().skip_while(|l| !l.trim_start().starts_with("tailgate.toml: |")).skip(1);
            let first = lines.next().unwrap();
            let indent = first.len() - first.trim_start().len();
            let mut toml = vec![first[indent..].to_string()];
            for line in lines {
                if !line.trim().is_empty() && line.len() - line.trim_start().len() < indent {
                    break;
                }
                toml.push(line.get(indent..).unwrap_or("").to_string());
            }
            found.insert(name, toml.join("\n"));
        }
    }
    found
}

#[test]
fn their_configs_are_valid() {
    let configs = configs();
    assert_eq!(configs.len(), 2, "{configs:?}");
    for (name, toml) in &configs {
        let config = tailgate::config::Config::parse(toml, &HashMap::new())
            .unwrap_or_else(|e| panic!("ConfigMap {name}: {e}\n{toml}"));
        assert!(config.metrics_listen.is_some(), "{name}: the probes need /healthz or status");
    }
    let node = tailgate::config::Config::parse(&configs["tailgate"], &HashMap::new()).unwrap();
    assert!(node.keep_datapath, "rolling updates take the datapath over");
    let proxy = tailgate::config::Config::parse(&configs["db-proxy"], &HashMap::new()).unwrap();
    assert!(proxy.proxy.egress_to.is_some());
}

#[test]
fn the_daemonset_grants_the_units_capabilities() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let unit = std::fs::read_to_string(root.join("deploy/tailgate.service")).unwrap();
    let mut from_unit: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap()
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_string())
        .collect();
    from_unit.sort();
    let mut containers = 0;
    for file in manifests() {
        let text = std::fs::read_to_string(&file).unwrap();
        for line in text.lines().filter(|l| l.trim_start().starts_with("add: [\"BPF\"")) {
            let list = line.split_once('[').unwrap().1.trim_end_matches(']');
            let mut granted: Vec<String> =
                list.split(',').map(|c| c.trim().trim_matches('"').to_string()).collect();
            granted.sort();
            assert_eq!(granted, from_unit, "{}: {line}", file.display());
            containers += 1;
        }
    }
    assert_eq!(containers, 2, "the DaemonSet's and the proxy's tailgate containers");
}
