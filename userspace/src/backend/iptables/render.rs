//! Renders the desired state into iptables tables (pure): each feature adds its rules to
//! tailgate's chains through one `Builder`, which knows which tables this host offers and
//! how chains are hooked into the built-in ones. Features render in pipeline order, so
//! within a shared chain (filter/tg-forward) the subnet-route rules come first.

use super::{
    cgnat, conntrack,
    exec::Available,
    mss, proxy, services,
    sets::SetSpec,
    subnet_routes,
    table::{Chain, Family, Hook, Rule, Table, TableSpec},
};
use crate::policy::DesiredState;

pub const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

/// How the chains are wired into the built-in ones, and where prefix lists go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wiring {
    /// Insert jumps from the built-in chains (`divert`); `false` renders no hooks.
    pub divert: bool,
    /// Keep those jumps first (`hook_position = "first"`).
    pub first: bool,
    /// User prefixes go into kernel sets named `<this>-<list>` (see `sets`); `None` (no
    /// ipset on this host): one rule per prefix.
    pub sets: Option<String>,
}

impl Wiring {
    /// Hooks in, not kept first, sets named `tg-00000000-*` (tests, `explain`).
    pub fn standard() -> Self {
        Self { divert: true, first: false, sets: Some(super::sets::name_prefix("")) }
    }
}

/// What the iptables backend writes: the tables, and the sets their rules match against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub tables: Vec<TableSpec>,
    pub sets: Vec<SetSpec>,
}

/// Collects chains per (family, table). Every table the host offers gets a spec, empty or
/// not, so writing the result also removes tailgate's chains a feature no longer wants.
pub struct Builder {
    wiring: Wiring,
    tables: Vec<TableSpec>,
    sets: Vec<SetSpec>,
}

impl Builder {
    pub fn new(available: &Available, wiring: Wiring) -> Self {
        let tables = available
            .iter()
            .map(|(family, table)| TableSpec { family, table, chains: Vec::new(), hooks: Vec::new() })
            .collect();
        Self { wiring, tables, sets: Vec::new() }
    }

    /// The start of set names, when prefix lists go into sets.
    pub fn sets(&self) -> Option<&str> {
        self.wiring.sets.as_deref()
    }

    /// Adds a set the rules match against; none where the host lacks its family's filter
    /// table (no rule would use it).
    pub fn add_set(&mut self, set: SetSpec) {
        if self.tables.iter().any(|t| t.family == set.family && t.table == Table::Filter) {
            self.sets.push(set);
        }
    }

    /// Appends `rules` to tailgate's chain `chain` of (`family`, `table`), hooked from the
    /// built-in chain `builtin`; nothing where the host lacks the table.
    pub fn add(
        &mut self,
        family: Family,
        table: Table,
        chain: &'static str,
        builtin: &'static str,
        rules: Vec<Rule>,
    ) {
        let Some(spec) = self.tables.iter_mut().find(|t| t.family == family && t.table == table) else {
            return;
        };
        match spec.chains.iter_mut().find(|c| c.name == chain) {
            Some(existing) => existing.rules.extend(rules),
            None => {
                spec.chains.push(Chain { name: chain.into(), rules });
                if self.wiring.divert {
                    spec.hooks.push(Hook {
                        builtin: builtin.into(),
                        target: chain.into(),
                        first: self.wiring.first,
                    });
                }
            }
        }
    }

    /// Like `add`, but ahead of the rules other features put there already.
    pub fn prepend(
        &mut self,
        family: Family,
        table: Table,
        chain: &'static str,
        builtin: &'static str,
        rules: Vec<Rule>,
    ) {
        let count = rules.len();
        self.add(family, table, chain, builtin, rules);
        let spec = self.tables.iter_mut().find(|t| t.family == family && t.table == table);
        if let Some(c) = spec.and_then(|t| t.chains.iter_mut().find(|c| c.name == chain)) {
            c.rules.rotate_right(count);
        }
    }

    pub fn finish(self) -> Rendered {
        Rendered { tables: self.tables, sets: self.sets }
    }
}

/// The tables and sets the iptables backend writes for `state`.
pub fn render(state: &DesiredState, wiring: Wiring, available: &Available) -> Rendered {
    let mut b = Builder::new(available, wiring);
    subnet_routes::render(&mut b, state);
    conntrack::render(&mut b, state);
    cgnat::render(&mut b, state);
    mss::render(&mut b, state);
    services::render(&mut b, state);
    proxy::render(&mut b, state);
    b.finish()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ipnet::IpNet;

    use super::*;
    use crate::{
        backend::iptables::{
            cgnat::{FORWARD, INPUT},
            subnet_routes::POSTROUTING,
            table::{plan, SavedTable},
        },
        config::Config,
        policy::{self, System, Verdict},
    };

    fn state(toml: &str) -> DesiredState {
        let config = Config::parse(toml, &HashMap::new()).unwrap();
        policy::compile(
            &config,
            System { uplinks: vec!["eth0".into()], tunnel_mtu: Some(1280), ..Default::default() },
        )
    }

    fn tables(toml: &str, divert: bool, available: Available) -> Vec<TableSpec> {
        rendered(toml, divert, available).tables
    }

    fn rendered(toml: &str, divert: bool, available: Available) -> Rendered {
        render(&state(toml), Wiring { divert, ..Wiring::standard() }, &available)
    }

    fn all() -> Available {
        Available::all()
    }

    /// Every restore payload for a fresh host, as tailgate would write them.
    fn payloads(tables: &[TableSpec]) -> String {
        tables
            .iter()
            .filter_map(|t| {
                let family = if t.family == Family::V4 { "iptables" } else { "ip6tables" };
                let payload = plan(t, &SavedTable::default())?;
                Some(format!("# {family}-restore --noflush\n{payload}"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Compares with `golden/<name>.rules`; `UPDATE_GOLDEN=1` rewrites the file (review
    /// the diff by eye before committing it).
    fn golden(name: &str, text: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/backend/iptables/golden")
            .join(format!("{name}.rules"));
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, text).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(text, want, "{name}: rendering changed; if intended, run with UPDATE_GOLDEN=1 and review");
    }

    /// The reference's behaviour: no exception for replies to the gateway's own connections.
    const REFERENCE: &str = "tunnel = \"tailscale0\"\n[cgnat]\nallow_replies = false";

    #[test]
    fn golden_reference_config() {
        golden("reference", &payloads(&tables(REFERENCE, true, all())));
    }

    #[test]
    fn golden_flows() {
        let toml = "tunnel = \"tailscale0\"\n[subnet_routes]\nstateful = true";
        golden("flows", &payloads(&tables(toml, true, all())));
    }

    #[test]
    fn golden_exemptions() {
        let r = rendered(EXEMPTIONS, true, all());
        let sets: String = r.sets.iter().map(|s| format!("# ipset restore\n{}\n", s.payload())).collect();
        golden("exemptions", &(sets + &payloads(&r.tables)));
    }

    /// Without ipset on the host: one rule per prefix, longest first.
    #[test]
    fn golden_exemptions_as_rule_lists() {
        let t = render(&state(EXEMPTIONS), Wiring { sets: None, ..Wiring::standard() }, &all());
        assert!(t.sets.is_empty());
        golden("exemptions_rule_lists", &payloads(&t.tables));
    }

    #[test]
    fn no_set_for_a_family_without_its_filter_table() {
        let r = rendered(EXEMPTIONS, true, all().without(Family::V6, Table::Filter));
        let names: Vec<&str> = r.sets.iter().map(|s| &s.name[12..]).collect();
        assert_eq!(names, ["in4", "fwd4"]);
    }

    const EXEMPTIONS: &str = r#"
        tunnel = "tailscale0"
        [cgnat]
        allow = ["100.100.0.0/16", "100.64.0.0/24", "fd7a:115c:a1e0:ab::/64"]
        drop = ["100.100.100.200/32"]
    "#;

    #[test]
    fn golden_mode_off() {
        golden(
            "mode_off",
            &payloads(&tables("tunnel = \"tailscale0\"\n[cgnat]\nmode = \"off\"", true, all())),
        );
    }

    #[test]
    fn golden_no_divert_and_no_ipv6_nat() {
        let available = all().without(Family::V6, Table::Nat);
        golden("no_divert_no_v6_nat", &payloads(&tables("tunnel = \"tailscale0\"", false, available)));
    }

    #[test]
    fn ipv6_is_skipped_where_unusable() {
        let mut available = all();
        for table in Table::ALL {
            available = available.without(Family::V6, table);
        }
        let t = tables("", true, available);
        assert!(t.iter().all(|t| t.family == Family::V4));
        assert_eq!(t.len(), 4);
    }

    /// The reference's filter rules (ts-input, ts-forward; TUN = tailscale0), rule for rule.
    const REFERENCE_INPUT: [&str; 3] = [
        "! -i tailscale0 -s 100.115.92.0/23 -j RETURN",
        "! -i tailscale0 -s 100.64.0.0/10 -j DROP",
        "-i tailscale0 -j ACCEPT",
    ];
    const REFERENCE_FORWARD: [&str; 4] = [
        "-i tailscale0 -j MARK --set-mark 0x40000/0xff0000",
        "-m mark --mark 0x40000/0xff0000 -j ACCEPT",
        "-o tailscale0 -s 100.64.0.0/10 -j DROP",
        "-o tailscale0 -j ACCEPT",
    ];

    #[test]
    fn reference_config_matches_the_reference_filter_rules_rule_for_rule() {
        let t = tables(REFERENCE, true, all());
        let filter = t.iter().find(|t| t.family == Family::V4 && t.table == Table::Filter).unwrap();
        let chain = |name: &str| -> Vec<&str> {
            filter
                .chains
                .iter()
                .find(|c| c.name == name)
                .unwrap()
                .rules
                .iter()
                .map(|r| r.spec.as_str())
                .collect()
        };
        assert_eq!(chain(INPUT), REFERENCE_INPUT);
        assert_eq!(chain(FORWARD), REFERENCE_FORWARD);
        let mut hooks: Vec<_> = filter.hooks.iter().map(|h| (&*h.builtin, &*h.target)).collect();
        hooks.sort();
        assert_eq!(hooks, [("FORWARD", FORWARD), ("INPUT", INPUT)]);
        // The reference masquerades hairpin traffic (tunnel to tunnel) too; here it keeps its
        // source, as `[subnet_routes] masquerade` documents.
        let nat = t.iter().find(|t| t.family == Family::V4 && t.table == Table::Nat).unwrap();
        assert_eq!(nat.chains[0].name, POSTROUTING);
        assert_eq!(
            nat.chains[0].rules[0].spec,
            "-m mark --mark 0x40000/0xff0000 ! -o tailscale0 -j MASQUERADE"
        );
    }

    #[test]
    fn subnet_route_settings_shape_the_rules() {
        let t = tables(
            "tunnel = \"tun0\"\n[subnet_routes]\nmark = \"0x1000/0xf000\"\nmasquerade = false",
            true,
            all(),
        );
        let filter = t.iter().find(|t| t.family == Family::V6 && t.table == Table::Filter).unwrap();
        let forward = filter.chains.iter().find(|c| c.name == FORWARD).unwrap();
        assert_eq!(forward.rules[0].spec, "-i tun0 -j MARK --set-mark 0x1000/0xf000");
        assert_eq!(forward.rules[1].spec, "-m mark --mark 0x1000/0xf000 -j ACCEPT");
        let nat = t.iter().find(|t| t.family == Family::V4 && t.table == Table::Nat).unwrap();
        assert!(nat.chains.is_empty() && nat.hooks.is_empty(), "masquerade = false: no nat chain");
    }

    #[test]
    fn mss_rules_per_setting() {
        let mss = |toml: &str| -> Vec<String> {
            let t = tables(&format!("tunnel = \"tun0\"\n[mss]\n{toml}"), true, all());
            let mangle = t.iter().find(|t| t.family == Family::V4 && t.table == Table::Mangle).unwrap();
            let chain = mangle.chains.iter().filter(|c| c.name == mss::CHAIN);
            chain.flat_map(|c| c.rules.iter().map(|r| r.spec.clone())).collect()
        };
        assert_eq!(
            mss(""),
            [
                "-i tun0 -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu",
                "-o tun0 -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu",
            ]
        );
        assert!(mss("clamp = 1200").iter().all(|r| r.ends_with("-j TCPMSS --set-mss 1200")));
        assert!(mss("clamp = \"off\"").is_empty());
    }

    #[test]
    fn replies_and_stateful_rules_come_before_the_prefix_rules() {
        let t = tables("tunnel = \"tun0\"\n[subnet_routes]\nstateful = true", true, all());
        for family in FAMILIES {
            let filter = t.iter().find(|t| t.family == family && t.table == Table::Filter).unwrap();
            let chain = |name: &str| -> Vec<&str> {
                let chain = filter.chains.iter().find(|c| c.name == name).unwrap();
                chain.rules.iter().map(|r| r.spec.as_str()).collect()
            };
            let input = chain(INPUT);
            assert!(input[0].contains("-m connmark --mark 0x1000000/0x1000000"), "{input:?}");
            assert!(input[0].ends_with("--ctstate ESTABLISHED,RELATED -j RETURN"), "{input:?}");
            assert!(input[1].contains(" -s "), "then the prefix rules: {input:?}");
            let forward = chain(FORWARD);
            // After the subnet-route mark and accept (traffic from the tunnel), before the
            // prefix rules (an exempt source does not get past it).
            assert_eq!(forward[2], "-o tun0 -m conntrack ! --ctstate ESTABLISHED,RELATED -j DROP");
            assert!(forward[3].contains(" -s "), "{forward:?}");
            let mangle = t.iter().find(|t| t.family == family && t.table == Table::Mangle).unwrap();
            let output = mangle.chains.iter().find(|c| c.name == conntrack::OUTPUT).unwrap();
            let marks: Vec<&str> = output.rules.iter().map(|r| r.spec.as_str()).collect();
            assert_eq!(
                marks,
                [
                    "-o tun0 -j RETURN",
                    "-o lo -j RETURN",
                    "-m conntrack --ctstate NEW -j CONNMARK --set-xmark 0x1000000/0x1000000"
                ]
            );
            assert!(mangle.hooks.iter().any(|h| h.builtin == "OUTPUT" && h.target == conntrack::OUTPUT));
        }
        // Off: none of them.
        let t = tables("tunnel = \"tun0\"\n[cgnat]\nallow_replies = false", true, all());
        let text = payloads(&t);
        assert!(!text.contains("conntrack") && !text.contains("connmark") && !text.contains("tg-output"));
    }

    #[test]
    fn rule_lists_give_the_longest_prefix_answer() {
        let toml =
            "[cgnat]\nallow = [\"100.100.0.0/16\"]\ndrop = [\"100.100.100.200/32\", \"100.100.100.0/24\"]";
        let t = render(&state(toml), Wiring { sets: None, ..Wiring::standard() }, &all()).tables;
        let config = Config::parse(toml, &HashMap::new()).unwrap();
        let state = policy::compile(&config, System::default());
        let filter = t.iter().find(|t| t.family == Family::V4 && t.table == Table::Filter).unwrap();
        let input = &filter.chains.iter().find(|c| c.name == INPUT).unwrap().rules;
        for addr in
            ["100.100.100.200", "100.100.100.7", "100.100.1.1", "100.64.0.1", "100.115.92.1", "198.51.100.1"]
        {
            let ip: std::net::IpAddr = addr.parse().unwrap();
            // First rule whose -s matches, as netfilter walks the chain.
            let first = input.iter().find(|r| {
                r.spec
                    .split_whitespace()
                    .skip_while(|w| *w != "-s")
                    .nth(1)
                    .is_some_and(|p| p.parse::<IpNet>().unwrap().contains(&ip))
            });
            let verdict = first.map(|r| if r.spec.ends_with("DROP") { Verdict::Drop } else { Verdict::Pass });
            let lpm = policy::resolve(&state.cgnat.inbound, ip).map(|r| r.verdict);
            assert_eq!(verdict, lpm, "{addr}");
        }
    }
}
