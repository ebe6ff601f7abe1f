//! A desired-state iptables table writer, after Calico Felix's `Table`.
//!
//! The desired content of each owned chain is kept in memory. Every rule carries a comment
//! `tailgate:<hash> <label>`, where the hash covers the chain name, the previous rule's
//! hash and the rule itself, so the list of hashes read back from `iptables-save` tells
//! exactly which chains are as desired without parsing rules. A plan declares (which, with
//! `iptables-restore --noflush`, flushes) and refills only the chains that differ, inserts
//! hooks only where no jump to the chain exists, removes owned leftovers, and goes to the
//! kernel as one `iptables-restore --noflush` per table: atomic.

use std::{borrow::Cow, collections::BTreeMap, fmt::Write as _};

use sha2::{Digest, Sha256};

/// Every comment tailgate writes starts with this.
pub const COMMENT_PREFIX: &str = "tailgate:";
/// Comment prefixes of rules written by older versions; removed wherever found.
pub const LEGACY_COMMENT_PREFIXES: &[&str] = &["tailgate "];
/// Owned chains are named `tg-*`.
pub const CHAIN_PREFIX: &str = "tg-";
const HOOK_COMMENT: &str = "tailgate:hook";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

/// The tables tailgate may write, in the order they are probed and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Filter,
    Nat,
    Mangle,
    Raw,
}

impl Table {
    pub const ALL: [Table; 4] = [Table::Filter, Table::Nat, Table::Mangle, Table::Raw];

    pub const fn name(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
            Table::Mangle => "mangle",
            Table::Raw => "raw",
        }
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The desired state of one table of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub family: Family,
    pub table: Table,
    pub chains: Vec<Chain>,
    /// Jumps from built-in chains, inserted at position 1 where missing.
    pub hooks: Vec<Hook>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: Cow<'static, str>,
    pub rules: Vec<Rule>,
}

/// One rule: its match and target (`! -i tun0 -s 100.64.0.0/10 -j DROP`), the counter its
/// packets count into (for `status`, read back from the comment), and a label for people
/// reading `iptables-save` (where it comes from).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    pub spec: String,
    /// A counter name (`tailgate_abi::counters::Counter::name`), or `-`.
    pub counter: Cow<'static, str>,
    pub label: String,
    /// The hash to write instead of computing one: a rule put back as it was read keeps
    /// the hash it was written with (iptables-save prints the rule in its own words, which
    /// would hash differently and make the next start rewrite it).
    pub hash: Option<String>,
}

impl Rule {
    pub fn new(spec: String, counter: &'static str, label: impl Into<String>) -> Self {
        Self { spec, counter: counter.into(), label: label.into(), hash: None }
    }

    fn counter_word(&self) -> &str {
        if self.counter.is_empty() {
            "-"
        } else {
            &self.counter
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub builtin: Cow<'static, str>,
    pub target: Cow<'static, str>,
    /// Keep tailgate's jump the first rule of `builtin` (`hook_position = "first"`): one that
    /// others pushed down is moved back on top. A jump the user wrote is never moved.
    pub first: bool,
}

impl Chain {
    /// The hash of each rule, in order.
    pub fn hashes(&self) -> Vec<String> {
        let mut prev = String::new();
        self.rules
            .iter()
            .map(|rule| {
                if let Some(hash) = &rule.hash {
                    prev = hash.clone();
                    return prev.clone();
                }
                let mut h = Sha256::new();
                for part in [&*self.name, &prev, &rule.spec, rule.counter_word(), &rule.label] {
                    h.update(part.as_bytes());
                    h.update([0]);
                }
                prev = h.finalize().iter().take(8).fold(String::new(), |mut s, b| {
                    let _ = write!(s, "{b:02x}");
                    s
                });
                prev.clone()
            })
            .collect()
    }

    fn render(&self, out: &mut Vec<String>) {
        out.push(format!(":{} - [0:0]", self.name));
        for (rule, hash) in self.rules.iter().zip(self.hashes()) {
            let comment = format!("{COMMENT_PREFIX}{hash} {} {}", rule.counter_word(), rule.label);
            out.push(format!("-A {} -m comment --comment \"{}\" {}", self.name, comment.trim(), rule.spec));
        }
    }
}

/// One rule as `iptables-save` printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRule {
    /// The line without counters and without `-A <chain> `.
    pub body: String,
    pub comment: Option<String>,
    pub packets: u64,
}

impl SavedRule {
    pub fn ours(&self) -> bool {
        self.comment.as_deref().is_some_and(|c| {
            c.starts_with(COMMENT_PREFIX) || LEGACY_COMMENT_PREFIXES.iter().any(|p| c.starts_with(p))
        })
    }

    /// The hash from a `tailgate:<hash> ...` comment.
    pub fn hash(&self) -> Option<&str> {
        self.comment.as_deref()?.strip_prefix(COMMENT_PREFIX)?.split_whitespace().next()
    }

    /// The counter and label from a `tailgate:<hash> <counter> <label>` comment.
    pub fn counter_and_label(&self) -> Option<(&str, &str)> {
        let rest = self.comment.as_deref()?.strip_prefix(COMMENT_PREFIX)?;
        let (_hash, rest) = rest.split_once(' ')?;
        Some(rest.split_once(' ').unwrap_or((rest, "")))
    }

    /// Whether this rule jumps or goes to `chain`.
    pub fn targets(&self, chain: &str) -> bool {
        let words: Vec<&str> = self.body.split_whitespace().collect();
        words.windows(2).any(|w| (w[0] == "-j" || w[0] == "-g") && w[1] == chain)
    }
}

/// The chains of one table as `iptables-save [-c] -t <table>` printed them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SavedTable {
    pub chains: BTreeMap<String, Vec<SavedRule>>,
}

impl SavedTable {
    pub fn parse(text: &str, table: &str) -> Self {
        let mut saved = SavedTable::default();
        let mut in_table = false;
        for line in text.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix('*') {
                in_table = name == table;
            } else if !in_table || line.starts_with('#') {
                continue;
            } else if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    saved.chains.entry(name.to_string()).or_default();
                }
            } else {
                let (packets, rest) = split_counters(line);
                let Some(rest) = rest.strip_prefix("-A ") else { continue };
                let Some((chain, body)) = rest.split_once(' ') else { continue };
                let rule = SavedRule { body: body.to_string(), comment: comment_of(body), packets };
                saved.chains.entry(chain.to_string()).or_default().push(rule);
            }
        }
        saved
    }
}

/// `[12:3456] -A ...` → (12, "-A ...").
fn split_counters(line: &str) -> (u64, &str) {
    if let Some(rest) = line.strip_prefix('[') {
        if let Some((counts, tail)) = rest.split_once("] ") {
            let packets = counts.split(':').next().and_then(|p| p.parse().ok()).unwrap_or(0);
            return (packets, tail);
        }
    }
    (0, line)
}

impl TableSpec {
    /// tailgate's part of a table as it was read back: its chains (rules as iptables-save
    /// printed them, labels from their comments) and its hooks. Written back with `plan`,
    /// it restores that state (a start that rolls back over a kept datapath).
    pub fn from_saved(family: Family, table: Table, saved: &SavedTable) -> Self {
        let chains = saved
            .chains
            .iter()
            .filter(|(name, _)| name.starts_with(CHAIN_PREFIX))
            .map(|(name, rules)| Chain {
                name: name.clone().into(),
                rules: rules
                    .iter()
                    .map(|r| {
                        let (counter, label) = r.counter_and_label().unwrap_or(("-", ""));
                        Rule {
                            spec: r.without_comment(),
                            counter: counter.to_string().into(),
                            label: label.to_string(),
                            hash: r.hash().map(String::from),
                        }
                    })
                    .collect(),
            })
            .collect();
        let mut hooks = Vec::new();
        for (builtin, rules) in saved.chains.iter().filter(|(name, _)| !name.starts_with(CHAIN_PREFIX)) {
            for rule in rules.iter().filter(|r| r.ours()) {
                let words: Vec<&str> = rule.body.split_whitespace().collect();
                if let Some(w) = words.windows(2).find(|w| w[0] == "-j" && w[1].starts_with(CHAIN_PREFIX)) {
                    let (builtin, target) = (builtin.clone().into(), w[1].to_string().into());
                    hooks.push(Hook { builtin, target, first: false });
                }
            }
        }
        Self { family, table, chains, hooks }
    }
}

impl SavedRule {
    /// The rule without its `-m comment --comment ...` match.
    pub fn without_comment(&self) -> String {
        let Some(start) = self.body.find("-m comment --comment ") else { return self.body.clone() };
        let rest = &self.body[start + "-m comment --comment ".len()..];
        let end = if let Some(quoted) = rest.strip_prefix('"') {
            let mut escaped = false;
            let close = quoted.char_indices().find(|&(_, c)| {
                let done = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                done
            });
            close.map_or(rest.len(), |(i, _)| i + 2)
        } else {
            rest.find(' ').unwrap_or(rest.len())
        };
        format!("{}{}", &self.body[..start], rest[end..].trim_start()).trim().to_string()
    }
}

/// The text of `--comment X` or `--comment "X Y"`.
fn comment_of(body: &str) -> Option<String> {
    let rest = &body[body.find("--comment ")? + "--comment ".len()..];
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = quoted.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.extend(chars.next()),
                '"' => return Some(out),
                c => out.push(c),
            }
        }
        Some(out)
    } else {
        rest.split_whitespace().next().map(String::from)
    }
}

/// The `iptables-restore --noflush` payload that turns `current` into `desired`, or `None`
/// when they already agree. With `desired.chains` and `hooks` empty it removes everything
/// tailgate owns in the table (cleanup).
pub fn plan(desired: &TableSpec, current: &SavedTable) -> Option<String> {
    let mut lines = Vec::new();
    for chain in &desired.chains {
        let have: Option<Vec<Option<&str>>> =
            current.chains.get(&*chain.name).map(|rules| rules.iter().map(SavedRule::hash).collect());
        let want: Vec<String> = chain.hashes();
        let same =
            have.is_some_and(|h| h.len() == want.len() && h.iter().zip(&want).all(|(a, b)| *a == Some(b)));
        if !same {
            chain.render(&mut lines);
        }
    }
    let wanted = |name: &str| desired.chains.iter().any(|c| c.name == name);
    // Owned rules in chains that are not ours (hooks, older versions' rules): keep the
    // wanted hooks, delete the rest.
    for (chain, rules) in &current.chains {
        if chain.starts_with(CHAIN_PREFIX) {
            continue;
        }
        for rule in rules.iter().filter(|r| r.ours()) {
            let is_wanted_hook =
                desired.hooks.iter().any(|h| h.builtin == chain.as_str() && rule.targets(&h.target));
            if !is_wanted_hook {
                lines.push(format!("-D {chain} {}", rule.body));
            }
        }
    }
    for hook in &desired.hooks {
        let rules = current.chains.get(&*hook.builtin).map(Vec::as_slice).unwrap_or_default();
        let insert = match rules.iter().position(|r| r.targets(&hook.target)) {
            None => true,
            Some(0) => false,
            Some(i) if hook.first && rules[i].ours() => {
                lines.push(format!("-D {} {}", hook.builtin, rules[i].body));
                true
            }
            Some(_) => false,
        };
        if insert {
            lines.push(format!(
                "-I {} 1 -m comment --comment \"{HOOK_COMMENT}\" -j {}",
                hook.builtin, hook.target
            ));
        }
    }
    // Owned chains no longer wanted: flush, and delete unless something of the user's still
    // jumps to them (a `divert = false` setup); then they stay, empty.
    for name in current.chains.keys().filter(|n| n.starts_with(CHAIN_PREFIX) && !wanted(n)) {
        let referenced = current.chains.iter().any(|(chain, rules)| {
            !chain.starts_with(CHAIN_PREFIX) && rules.iter().any(|r| !r.ours() && r.targets(name))
        });
        if !current.chains[name].is_empty() {
            lines.push(format!(":{name} - [0:0]"));
        }
        if !referenced {
            lines.push(format!("-X {name}"));
        }
    }
    if lines.is_empty() {
        return None;
    }
    Some(format!("*{}\n{}\nCOMMIT\n", desired.table, lines.join("\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(chains: Vec<Chain>, hooks: Vec<Hook>) -> TableSpec {
        TableSpec { family: Family::V4, table: Table::Filter, chains, hooks }
    }

    fn input(rules: &[&str]) -> Chain {
        Chain {
            name: "tg-input".into(),
            rules: rules
                .iter()
                .map(|s| Rule { spec: s.to_string(), label: "test".into(), ..Default::default() })
                .collect(),
        }
    }

    const HOOK: Hook =
        Hook { builtin: Cow::Borrowed("INPUT"), target: Cow::Borrowed("tg-input"), first: false };

    /// What iptables-save would print after applying `payload` to nothing.
    fn saved_after(payload: &str) -> SavedTable {
        let text = payload.replace("-I INPUT 1 ", "-A INPUT ");
        SavedTable::parse(&text, "filter")
    }

    #[test]
    fn fresh_table_gets_chains_and_hooks() {
        let desired = spec(vec![input(&["-j DROP"])], vec![HOOK]);
        let payload = plan(&desired, &SavedTable::default()).unwrap();
        assert!(
            payload.starts_with("*filter\n:tg-input - [0:0]\n-A tg-input -m comment --comment \"tailgate:")
        );
        assert!(payload.contains("-I INPUT 1 -m comment --comment \"tailgate:hook\" -j tg-input"));
        assert!(payload.ends_with("COMMIT\n"));
    }

    #[test]
    fn applied_state_needs_no_write() {
        let desired = spec(vec![input(&["-s 100.64.0.0/10 -j DROP", "-j RETURN"])], vec![HOOK]);
        let saved = saved_after(&plan(&desired, &SavedTable::default()).unwrap());
        assert_eq!(plan(&desired, &saved), None);
    }

    #[test]
    fn only_changed_chains_are_rewritten() {
        let forward = Chain {
            name: "tg-forward".into(),
            rules: vec![Rule { spec: "-j ACCEPT".into(), ..Default::default() }],
        };
        let before = spec(vec![input(&["-j DROP"]), forward.clone()], vec![HOOK]);
        let saved = saved_after(&plan(&before, &SavedTable::default()).unwrap());
        let after = spec(vec![input(&["-s 100.100.0.0/16 -j RETURN", "-j DROP"]), forward], vec![HOOK]);
        let payload = plan(&after, &saved).unwrap();
        assert!(payload.contains(":tg-input - [0:0]"));
        assert!(!payload.contains("tg-forward"), "{payload}");
        assert!(!payload.contains("INPUT 1"), "hook present: not inserted again\n{payload}");
    }

    #[test]
    fn a_flushed_chain_or_deleted_hook_is_restored() {
        let desired = spec(vec![input(&["-j DROP"])], vec![HOOK]);
        let mut saved = saved_after(&plan(&desired, &SavedTable::default()).unwrap());
        saved.chains.get_mut("tg-input").unwrap().clear();
        saved.chains.get_mut("INPUT").unwrap().clear();
        let payload = plan(&desired, &saved).unwrap();
        assert!(payload.contains("-A tg-input"));
        assert!(payload.contains("-I INPUT 1"));
    }

    #[test]
    fn hook_position_first_moves_our_pushed_down_hook_back_on_top() {
        let text = "*filter\n:INPUT ACCEPT [0:0]\n:tg-input - [0:0]\n-A INPUT -j ACCEPT\n-A INPUT -m comment --comment \"tailgate:hook\" -j tg-input\nCOMMIT\n";
        let saved = SavedTable::parse(text, "filter");
        let keep = spec(vec![], vec![HOOK]);
        let first = spec(vec![], vec![Hook { first: true, ..HOOK }]);
        let payload = |spec: &TableSpec| plan(spec, &saved).unwrap_or_default();
        assert!(!payload(&keep).contains("INPUT"), "keep: left where it is\n{}", payload(&keep));
        let moved = payload(&first);
        let delete = moved.find("-D INPUT -m comment --comment \"tailgate:hook\" -j tg-input").unwrap();
        let insert = moved.find("-I INPUT 1 -m comment").unwrap();
        assert!(delete < insert, "{moved}");
        // Already first: nothing to do. A user's own jump is never moved.
        let text = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\n-A INPUT -j tg-input\nCOMMIT\n";
        let user = SavedTable::parse(text, "filter");
        assert!(!plan(&first, &user).unwrap_or_default().contains("INPUT"));
    }

    #[test]
    fn a_user_jump_counts_as_a_hook_and_is_never_deleted() {
        let text = "*filter\n:INPUT ACCEPT [0:0]\n:tg-input - [0:0]\n-A INPUT -s 10.0.0.0/8 -j ACCEPT\n-A INPUT -j tg-input\nCOMMIT\n";
        let saved = SavedTable::parse(text, "filter");
        // With the hook wanted: already present, nothing inserted.
        let payload = plan(&spec(vec![input(&["-j DROP"])], vec![HOOK]), &saved).unwrap();
        assert!(!payload.contains("INPUT 1") && !payload.contains("-D INPUT"), "{payload}");
        // divert = false: no hook wanted, the user's jump stays.
        let payload = plan(&spec(vec![input(&["-j DROP"])], vec![]), &saved).unwrap();
        assert!(!payload.contains("-D INPUT"), "{payload}");
        // Cleanup: the chain is referenced by the user's jump: flushed, not deleted.
        let payload = plan(&spec(vec![], vec![]), &saved).unwrap_or_default();
        assert!(!payload.contains("-X tg-input") && !payload.contains("-D INPUT"), "{payload}");
    }

    #[test]
    fn cleanup_removes_hooks_chains_and_older_versions_rules() {
        let text = concat!(
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:tg-input - [0:0]\n:tg-old - [0:0]\n",
            "[3:180] -A INPUT -m comment --comment \"tailgate:hook\" -j tg-input\n",
            "-A FORWARD -m comment --comment \"tailgate old-style rule\" -j ACCEPT\n",
            "-A FORWARD -j ACCEPT\n",
            "-A tg-input -m comment --comment tailgate:0011 -j DROP\nCOMMIT\n"
        );
        let saved = SavedTable::parse(text, "filter");
        assert_eq!(saved.chains["INPUT"][0].packets, 3);
        let payload = plan(&spec(vec![], vec![]), &saved).unwrap();
        assert!(payload.contains("-D INPUT -m comment --comment \"tailgate:hook\" -j tg-input"));
        assert!(payload.contains("-D FORWARD -m comment --comment \"tailgate old-style rule\" -j ACCEPT"));
        assert!(!payload.contains("-D FORWARD -j ACCEPT"), "the user's rule stays");
        assert!(payload.contains(":tg-input - [0:0]\n-X tg-input"));
        assert!(payload.contains("\n-X tg-old") && !payload.contains(":tg-old"), "empty: deleted, no flush");
    }

    #[test]
    fn hashes_depend_on_position_and_content() {
        let a = input(&["-j DROP", "-j RETURN"]).hashes();
        let b = input(&["-j RETURN", "-j DROP"]).hashes();
        let c = input(&["-j DROP", "-j RETURN"]).hashes();
        assert_eq!(a, c);
        assert_ne!(a[0], b[1], "same rule at another position hashes differently");
        assert_eq!(a[0].len(), 16);
    }

    #[test]
    fn a_saved_table_restores_what_it_held() {
        let desired = spec(vec![input(&["-s 100.64.0.0/10 -j DROP", "-j RETURN"])], vec![HOOK]);
        let saved = saved_after(&plan(&desired, &SavedTable::default()).unwrap());
        let restored = TableSpec::from_saved(Family::V4, Table::Filter, &saved);
        assert_eq!(restored.hooks, [HOOK]);
        let rules: Vec<_> =
            restored.chains[0].rules.iter().map(|r| (r.spec.as_str(), r.label.as_str())).collect();
        assert_eq!(rules, [("-s 100.64.0.0/10 -j DROP", "test"), ("-j RETURN", "test")]);
        // Written over something else, it brings the same rules back.
        let other = saved_after(
            &plan(&spec(vec![input(&["-j ACCEPT"])], vec![HOOK]), &SavedTable::default()).unwrap(),
        );
        let payload = plan(&restored, &other).unwrap();
        assert!(payload.contains("-s 100.64.0.0/10 -j DROP") && !payload.contains("-j ACCEPT"), "{payload}");
        // With their hashes, so the original spec then finds the chain as desired.
        assert_eq!(restored.chains[0].hashes(), desired.chains[0].hashes());
        assert!(payload.contains(&format!("tailgate:{} - test", desired.chains[0].hashes()[0])), "{payload}");
    }

    #[test]
    fn comments_parse_quoted_and_bare() {
        let saved = SavedTable::parse(
            "*filter\n-A tg-input -m comment --comment tailgate:ab12 -j DROP\n-A tg-input -m comment --comment \"tailgate:cd34 cgnat.allow[0]\" -j RETURN\nCOMMIT\n",
            "filter",
        );
        let rules = &saved.chains["tg-input"];
        assert_eq!(rules[0].hash(), Some("ab12"));
        assert_eq!(rules[1].hash(), Some("cd34"));
        assert_eq!(rules[1].comment.as_deref(), Some("tailgate:cd34 cgnat.allow[0]"));
    }
}
