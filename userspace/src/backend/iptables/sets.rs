//! Prefix policies in kernel sets (`ipset` `hash:net`), so a packet costs one hash lookup per
//! prefix length present instead of one rule per prefix.
//!
//! One set per family and direction holds every prefix of that list: pass prefixes as
//! entries, drop prefixes as `nomatch` entries. hash:net tests the most specific prefix
//! first and answers "no match" when that entry is `nomatch`, so `--match-set` is true
//! exactly when the longest matching prefix passes (`policy::resolve`). Entries carry the
//! config field they come from as their comment, and packet counters.
//!
//! A changed set is built under `<name>-new` and `ipset swap`ped in: a reload never shows a
//! half-filled list. Everything goes through `ipset restore` (one exec per step).

use std::{collections::BTreeMap, fmt::Write as _, process::Command, sync::Arc};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use sha2::{Digest, Sha256};

use super::{
    exec::{exists, fed},
    table::Family,
};

/// Suffix of the set a change is built in before the swap.
pub const STAGING: &str = "-new";
/// Room a set is created with, whatever its size: a repair never finds it full.
const MIN_MAXELEM: usize = 65_536;

/// One desired set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub name: String,
    pub family: Family,
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub prefix: IpNet,
    /// The prefix is an exception: a lookup that ends on it does not match.
    pub nomatch: bool,
    /// Where the prefix comes from (`cgnat.allow[3]`), shown by `ipset list`.
    pub comment: String,
}

/// `tg-<8 hex>`: the start of this instance's set names, from its pin directory (ipset
/// names are at most 31 characters; several instances can keep sets side by side).
pub fn name_prefix(instance: &str) -> String {
    let hash = Sha256::digest(instance.as_bytes());
    format!("tg-{:02x}{:02x}{:02x}{:02x}", hash[0], hash[1], hash[2], hash[3])
}

/// Whether `name` is a set some tailgate instance writes: `tg-<8 hex>-<list>[-new]`.
pub fn is_tailgate_set(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("tg-") else { return false };
    let (hash, list) = rest.split_at_checked(8).unwrap_or(("", ""));
    let list = list.strip_suffix(STAGING).unwrap_or(list);
    hash.bytes().all(|b| b.is_ascii_hexdigit())
        && hash.len() == 8
        && ["-in4", "-in6", "-fwd4", "-fwd6"].contains(&list)
}

impl SetSpec {
    fn family_word(&self) -> &'static str {
        match self.family {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        }
    }

    /// The `ipset restore` payload that creates this set as desired.
    pub fn payload(&self) -> String {
        let mut out = String::new();
        self.build(&self.name, &mut out);
        out
    }

    /// `create` and `add` lines that build this set's content under `name`.
    fn build(&self, name: &str, out: &mut String) {
        let count = self.entries.len();
        // Small: the kernel grows the table as it fills, and reading a set's header (the
        // repair's check) walks every bucket.
        let hashsize = (count.max(1).next_power_of_two() / 8).max(1024);
        let maxelem = (2 * count).max(MIN_MAXELEM);
        let _ = writeln!(
            out,
            "create {name} hash:net family {} hashsize {hashsize} maxelem {maxelem} counters comment",
            self.family_word()
        );
        for e in &self.entries {
            let nomatch = if e.nomatch { " nomatch" } else { "" };
            let _ =
                writeln!(out, "add {name} {}{nomatch} comment \"{}\"", e.prefix, e.comment.replace('"', "'"));
        }
    }

    /// Whether the set in force looks like this one, from its header alone (a header
    /// without an entry count passes: `same_members` tells).
    pub fn matches(&self, header: &Header) -> bool {
        header.kind == "hash:net"
            && header.family == self.family_word()
            && header.entries.is_none_or(|n| n == self.entries.len())
    }

    /// Whether `members` (as listed) are exactly this set's entries, flags included.
    pub fn same_members(&self, members: &[Member]) -> bool {
        let mut want: Vec<(IpNet, bool)> = self.entries.iter().map(|e| (e.prefix, e.nomatch)).collect();
        let mut have: Vec<(IpNet, bool)> = members.iter().map(|m| (m.prefix, m.nomatch)).collect();
        want.sort_unstable();
        have.sort_unstable();
        want == have
    }
}

/// What `ipset list -t` says of one set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    pub kind: String,
    pub family: String,
    /// `None` where the kernel does not say (before Linux 4.12 or so): count the members.
    pub entries: Option<usize>,
    /// The hash's seed, new with every set created: another set swapped in under the name
    /// shows here.
    pub initval: Option<String>,
    /// Bytes the set takes, comments included: an entry replaced or re-added (its comment
    /// gone) shows here even when the count stays.
    pub memsize: Option<u64>,
}

impl Header {
    /// What tells this set's content apart from another's with the same count.
    pub fn fingerprint(&self) -> (Option<&str>, Option<u64>) {
        (self.initval.as_deref(), self.memsize)
    }
}

/// One member as `ipset list <name>` prints it (for `status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub prefix: IpNet,
    pub nomatch: bool,
    pub packets: u64,
    pub comment: String,
}

/// Runs `ipset`: the real binary, or a stand-in in tests.
pub trait Runner: Send + Sync {
    /// `ipset restore` with `payload`; applied line by line, stops at the first failure.
    fn restore(&self, payload: &str) -> Result<()>;
    /// `ipset list [-t] [name]`.
    fn list(&self, name: Option<&str>, headers_only: bool) -> Result<String>;
}

/// The ipset of this host (in the current network namespace).
#[derive(Clone)]
pub struct Ipset {
    runner: Arc<dyn Runner>,
}

impl std::fmt::Debug for Ipset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ipset")
    }
}

/// A change of sets made and not finished yet: what undoes it, or completes it.
#[derive(Debug, Default)]
#[must_use = "finish or undo a staged change"]
pub struct Staged {
    /// Sets created by this change (they did not exist).
    created: Vec<String>,
    /// Sets swapped: the content they had now sits under `<name>-new`.
    swapped: Vec<String>,
}

impl Staged {
    /// The names of the sets it changed.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.created.iter().chain(&self.swapped)
    }
}

struct Binary;

const IPSET: &str = "ipset";

impl Runner for Binary {
    fn restore(&self, payload: &str) -> Result<()> {
        if let Some(err) = fed(Command::new(IPSET).arg("restore"), payload)? {
            let first = payload.lines().next().unwrap_or_default();
            bail!("ipset restore failed: {err} (payload starting `{first}`)");
        }
        Ok(())
    }

    fn list(&self, name: Option<&str>, headers_only: bool) -> Result<String> {
        let mut cmd = Command::new(IPSET);
        cmd.arg("list");
        if headers_only {
            cmd.arg("-t");
        }
        cmd.args(name);
        let out = cmd.output().context("running ipset")?;
        if !out.status.success() {
            bail!("ipset list: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Ipset {
    /// The `ipset` tool, if installed (for reading: `status`, `explain`, cleanup).
    pub fn installed() -> Result<Self> {
        if !exists(IPSET) {
            bail!("ipset not found (install the ipset package)");
        }
        Ok(Self::with_runner(Arc::new(Binary)))
    }

    /// The `ipset` tool, if installed and the kernel can hold the sets tailgate writes (the
    /// backend's start).
    pub fn probe() -> Result<Self> {
        let ipset = Self::installed()?;
        ipset.runner.list(None, true).context("the kernel's ipset")?;
        // The set type and extensions tailgate creates, in both families.
        let probe = format!("tg-probe-{}", std::process::id());
        let mut payload = String::new();
        for family in ["inet", "inet6"] {
            let _ = writeln!(
                payload,
                "create {probe} hash:net family {family} counters comment\ndestroy {probe}"
            );
        }
        ipset.runner.restore(&payload).context("the kernel's ipset hash:net with counters and comments")?;
        Ok(ipset)
    }

    pub fn with_runner(runner: Arc<dyn Runner>) -> Self {
        Self { runner }
    }

    /// Every set's header, by name.
    pub fn headers(&self) -> Result<BTreeMap<String, Header>> {
        Ok(parse_headers(&self.runner.list(None, true)?))
    }

    /// The members of `name`.
    pub fn members(&self, name: &str) -> Result<Vec<Member>> {
        Ok(parse_members(&self.runner.list(Some(name), false)?))
    }

    /// Puts the content of `sets` in force: a set that does not exist is created and
    /// filled; one that does is built under `<name>-new` and swapped in. Nothing is left
    /// changed when this fails. `finish` or `undo` the result.
    pub fn stage(&self, sets: &[&SetSpec], current: &BTreeMap<String, Header>) -> Result<Staged> {
        let mut staged = Staged::default();
        if sets.is_empty() {
            return Ok(staged);
        }
        let mut payload = String::new();
        let mut built = Vec::new();
        for set in sets {
            let staging = format!("{}{STAGING}", set.name);
            if current.contains_key(&staging) {
                // Left by a run that stopped half-way.
                let _ = writeln!(payload, "destroy {staging}");
            }
            match current.get(&set.name) {
                None => {
                    set.build(&set.name, &mut payload);
                    built.push(set.name.clone());
                    staged.created.push(set.name.clone());
                }
                Some(h) if h.kind != "hash:net" || h.family != set.family_word() => {
                    bail!(
                        "a set named {} exists with another type ({} {}); remove it",
                        set.name,
                        h.kind,
                        h.family
                    )
                }
                Some(_) => {
                    set.build(&staging, &mut payload);
                    built.push(staging);
                }
            }
        }
        if let Err(e) = self.runner.restore(&payload) {
            self.destroy_quietly(&built);
            return Err(e.context("building the prefix sets"));
        }
        for set in sets.iter().filter(|s| current.contains_key(&s.name)) {
            let swap = format!("swap {}{STAGING} {}\n", set.name, set.name);
            if let Err(e) = self.runner.restore(&swap) {
                self.undo(staged);
                self.destroy_quietly(&built);
                return Err(e.context(format!("swapping {} in", set.name)));
            }
            staged.swapped.push(set.name.clone());
        }
        Ok(staged)
    }

    /// A staged change stands: the content it replaced goes.
    pub fn finish(&self, staged: Staged) {
        let old: Vec<String> = staged.swapped.iter().map(|n| format!("{n}{STAGING}")).collect();
        self.destroy_quietly(&old);
    }

    /// Takes a staged change back: swapped sets get their content back, created ones go
    /// (after the rules that referred to them, which the caller has put back first).
    pub fn undo(&self, staged: Staged) {
        for name in &staged.swapped {
            if let Err(e) = self.runner.restore(&format!("swap {name}{STAGING} {name}\n")) {
                tracing::error!("ipset: could not put {name} back: {e:#}");
            }
        }
        self.finish(Staged { created: Vec::new(), swapped: staged.swapped });
        self.destroy_quietly(&staged.created);
    }

    /// Destroys the sets named, each on its own (one in use does not keep the others).
    pub fn destroy(&self, names: &[String]) -> Result<()> {
        let mut first_error = None;
        for name in names {
            if let Err(e) = self.runner.restore(&format!("destroy {name}\n")) {
                first_error.get_or_insert(e.context(format!("destroying set {name}")));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn destroy_quietly(&self, names: &[String]) {
        if let Err(e) = self.destroy(names) {
            tracing::warn!("ipset: {e:#}");
        }
    }
}

/// The sets of `desired` whose header in force differs (missing, emptied, entries added or
/// deleted by another program, another type).
pub fn differing<'a>(desired: &'a [SetSpec], current: &BTreeMap<String, Header>) -> Vec<&'a SetSpec> {
    desired.iter().filter(|s| current.get(&s.name).is_none_or(|h| !s.matches(h))).collect()
}

fn parse_headers(text: &str) -> BTreeMap<String, Header> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, Header)> = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match key {
            "Name" => {
                out.extend(current.take());
                current = Some((value.to_string(), Header::default()));
            }
            _ => {
                let Some((_, header)) = current.as_mut() else { continue };
                match key {
                    "Type" => header.kind = value.to_string(),
                    "Header" => {
                        let words: Vec<&str> = value.split_whitespace().collect();
                        let after = |key: &str| {
                            let i = words.iter().position(|w| *w == key)?;
                            words.get(i + 1).map(|w| w.to_string())
                        };
                        header.family = after("family").unwrap_or_default();
                        header.initval = after("initval");
                    }
                    "Size in memory" => header.memsize = value.parse().ok(),
                    "Number of entries" => header.entries = value.parse().ok(),
                    _ => {}
                }
            }
        }
    }
    out.extend(current);
    out
}

/// `100.100.0.0/16 nomatch packets 3 bytes 252 comment "cgnat.allow[0]"` per line.
fn parse_members(text: &str) -> Vec<Member> {
    let members = text.split_once("Members:\n").map_or("", |(_, m)| m);
    members
        .lines()
        .filter_map(|line| {
            let (head, comment) = match line.split_once(" comment \"") {
                Some((head, c)) => (head, c.trim_end_matches('"').to_string()),
                None => (line, String::new()),
            };
            let words: Vec<&str> = head.split_whitespace().collect();
            // A host entry is printed without its length.
            let first = words.first()?;
            let prefix: IpNet =
                first.parse().ok().or_else(|| first.parse::<std::net::IpAddr>().ok().map(IpNet::from))?;
            let packets =
                words.iter().position(|w| *w == "packets").and_then(|i| words.get(i + 1)?.parse().ok());
            Some(Member {
                prefix,
                nomatch: words.contains(&"nomatch"),
                packets: packets.unwrap_or(0),
                comment,
            })
        })
        .collect()
}

/// The entry of `set` a lookup of `addr` ends on: the longest prefix holding it (what
/// hash:net returns, `nomatch` or not).
pub fn lookup(set: &SetSpec, addr: std::net::IpAddr) -> Option<&Entry> {
    set.entries.iter().filter(|e| e.prefix.contains(&addr)).max_by_key(|e| e.prefix.prefix_len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_recognised() {
        let prefix = name_prefix("sys_fs_bpf_tailgate");
        assert_eq!(prefix.len(), 11);
        for list in ["in4", "in6", "fwd4", "fwd6"] {
            let name = format!("{prefix}-{list}{STAGING}");
            assert!(name.len() <= 31, "{name}");
            assert!(is_tailgate_set(&name) && is_tailgate_set(&format!("{prefix}-{list}")));
        }
        assert_ne!(name_prefix("a"), name_prefix("b"));
        for other in ["tg-1234567-in4", "tg-12345678-out4", "kube-tg-12345678-in4", "tg-1234567g-in4"] {
            assert!(!is_tailgate_set(other), "{other}");
        }
    }

    #[test]
    fn headers_and_members_parse() {
        let text = "Name: a\nType: hash:net\nRevision: 7\nHeader: family inet6 hashsize 1024 maxelem 65536 counters comment\n\
                    Size in memory: 829\nReferences: 2\nNumber of entries: 3\n\nName: b\nType: hash:ip\nHeader: family inet\nReferences: 0\nNumber of entries: 0\n";
        let headers = parse_headers(text);
        assert_eq!(
            headers["a"],
            Header {
                kind: "hash:net".into(),
                family: "inet6".into(),
                entries: Some(3),
                initval: None,
                memsize: Some(829)
            }
        );
        assert_eq!(headers["b"].kind, "hash:ip");
        let members = parse_members(
            "Name: a\nMembers:\n100.100.1.0/24 nomatch packets 1 bytes 84 comment \"cgnat.drop[0]\"\n\
             100.64.0.0/10 packets 0 bytes 0 comment \"builtin: CGNAT range\"\n\
             100.64.0.2 packets 7 bytes 0 comment \"cgnat.drop[1]\"\n",
        );
        assert_eq!(members.len(), 3);
        assert_eq!((members[2].prefix.to_string(), members[2].packets), ("100.64.0.2/32".into(), 7));
        assert_eq!(
            members[0],
            Member {
                prefix: "100.100.1.0/24".parse().unwrap(),
                nomatch: true,
                packets: 1,
                comment: "cgnat.drop[0]".into()
            }
        );
        assert_eq!(members[1].comment, "builtin: CGNAT range");
        assert!(!members[1].nomatch);
    }

    #[test]
    fn a_set_builds_with_room_and_comments() {
        let set = SetSpec {
            name: "tg-00000000-in4".into(),
            family: Family::V4,
            entries: vec![
                Entry {
                    prefix: "100.64.0.0/10".parse().unwrap(),
                    nomatch: true,
                    comment: "builtin: CGNAT range".into(),
                },
                Entry {
                    prefix: "100.100.0.0/16".parse().unwrap(),
                    nomatch: false,
                    comment: "cgnat.allow[0]".into(),
                },
            ],
        };
        let mut out = String::new();
        set.build("x", &mut out);
        assert_eq!(
            out,
            "create x hash:net family inet hashsize 1024 maxelem 65536 counters comment\n\
             add x 100.64.0.0/10 nomatch comment \"builtin: CGNAT range\"\n\
             add x 100.100.0.0/16 comment \"cgnat.allow[0]\"\n"
        );
        let header =
            Header { kind: "hash:net".into(), family: "inet".into(), entries: Some(2), ..Default::default() };
        assert!(set.matches(&header));
        assert!(!set.matches(&Header { entries: Some(0), ..header.clone() }), "a flushed set differs");
        let member = |prefix: &str, nomatch| Member {
            prefix: prefix.parse().unwrap(),
            nomatch,
            packets: 9,
            comment: String::new(),
        };
        assert!(set.same_members(&[member("100.100.0.0/16", false), member("100.64.0.0/10", true)]));
        assert!(
            !set.same_members(&[member("100.100.0.0/16", true), member("100.64.0.0/10", true)]),
            "a flag flipped"
        );
        assert_eq!(lookup(&set, "100.100.3.3".parse().unwrap()).unwrap().comment, "cgnat.allow[0]");
        assert!(lookup(&set, "100.65.0.1".parse().unwrap()).unwrap().nomatch);
        assert!(lookup(&set, "8.8.8.8".parse().unwrap()).is_none());
    }
}
