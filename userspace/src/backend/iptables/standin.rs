//! A stand-in for `iptables-save` / `iptables-restore --noflush` (tests only): tables kept
//! as text in memory, restore payloads applied line by line as the real tool does
//! (atomically: a failing payload changes nothing), and a switch to make the restore of one
//! table fail, so the writer's roll-back paths can be tested without root.

use std::{collections::BTreeMap, sync::Mutex};

use anyhow::{bail, Result};

use super::{
    exec::Runner,
    table::{Family, Table},
};

/// Chain name → (policy, rule bodies).
type Chains = BTreeMap<String, (String, Vec<String>)>;

#[derive(Default)]
pub struct StandIn {
    tables: Mutex<BTreeMap<(Family, Table), Chains>>,
    /// Restores of this (family, table) fail.
    pub fail: Mutex<Option<(Family, Table)>>,
    /// Bumped by every restore that changes something, as nf_tables' generation.
    generation: Mutex<u32>,
    /// Tables read (saves), to tell when a repair read them.
    pub reads: Mutex<usize>,
}

const BUILTIN: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

impl StandIn {
    /// Adds a rule of someone else's (or an earlier run's) to `chain`, creating it.
    pub fn append(&self, family: Family, table: Table, chain: &str, body: &str) {
        let mut tables = self.tables.lock().unwrap();
        let chains = tables.entry((family, table)).or_insert_with(fresh);
        chains.entry(chain.to_string()).or_insert_with(|| ("-".into(), Vec::new())).1.push(body.to_string());
        *self.generation.lock().unwrap() += 1;
    }

    /// Every rule line of every table, for comparisons.
    pub fn dump(&self) -> Vec<String> {
        let tables = self.tables.lock().unwrap();
        let mut out = Vec::new();
        for ((family, table), chains) in tables.iter() {
            for (chain, (_, rules)) in chains {
                out.push(format!("{family:?} {table} :{chain}"));
                out.extend(rules.iter().map(|r| format!("{family:?} {table} -A {chain} {r}")));
            }
        }
        out
    }
}

fn fresh() -> Chains {
    BUILTIN.iter().map(|c| (c.to_string(), ("ACCEPT".to_string(), Vec::new()))).collect()
}

impl Runner for StandIn {
    fn save(&self, family: Family, table: Table, _counters: bool) -> Result<String> {
        *self.reads.lock().unwrap() += 1;
        let mut tables = self.tables.lock().unwrap();
        let chains = tables.entry((family, table)).or_insert_with(fresh);
        let mut out = format!("*{table}\n");
        for (name, (policy, _)) in chains.iter() {
            out += &format!(":{name} {policy} [0:0]\n");
        }
        for (name, (_, rules)) in chains.iter() {
            for rule in rules {
                out += &format!("-A {name} {rule}\n");
            }
        }
        out += "COMMIT\n";
        Ok(out)
    }

    fn generation(&self) -> Option<Result<u32>> {
        Some(Ok(*self.generation.lock().unwrap()))
    }

    fn save_all(&self, family: Family) -> Result<String> {
        Table::ALL.into_iter().map(|table| self.save(family, table, false)).collect()
    }

    fn restore(&self, family: Family, payload: &str) -> Result<()> {
        let mut tables = self.tables.lock().unwrap();
        let mut lines = payload.lines();
        let Some(table) = lines.next().and_then(|l| l.strip_prefix('*')) else { bail!("no table line") };
        let table = Table::ALL.into_iter().find(|t| t.name() == table).expect("a known table");
        if *self.fail.lock().unwrap() == Some((family, table)) {
            bail!("iptables-restore: line 2 failed (stand-in)");
        }
        let mut chains = tables.get(&(family, table)).cloned().unwrap_or_else(fresh);
        for line in lines {
            let (op, rest) = line.split_once(' ').unwrap_or((line, ""));
            match op {
                "COMMIT" => break,
                _ if op.starts_with(':') => {
                    chains.insert(op[1..].to_string(), ("-".into(), Vec::new()));
                }
                "-A" => {
                    let (chain, body) = rest.split_once(' ').unwrap_or((rest, ""));
                    let Some((_, rules)) = chains.get_mut(chain) else { bail!("no chain {chain}") };
                    rules.push(body.to_string());
                }
                "-I" => {
                    let mut parts = rest.splitn(3, ' ');
                    let (chain, _one, body) =
                        (parts.next().unwrap(), parts.next(), parts.next().unwrap_or(""));
                    let Some((_, rules)) = chains.get_mut(chain) else { bail!("no chain {chain}") };
                    rules.insert(0, body.to_string());
                }
                "-D" => {
                    let (chain, body) = rest.split_once(' ').unwrap_or((rest, ""));
                    let Some((_, rules)) = chains.get_mut(chain) else { bail!("no chain {chain}") };
                    let Some(i) = rules.iter().position(|r| r == body) else {
                        bail!("no such rule in {chain}")
                    };
                    rules.remove(i);
                }
                "-X" => {
                    let referenced =
                        chains.values().flat_map(|(_, r)| r).any(|r| r.ends_with(&format!("-j {rest}")));
                    if referenced || chains.get(rest).is_some_and(|(_, r)| !r.is_empty()) {
                        bail!("chain {rest} in use or not empty");
                    }
                    chains.remove(rest);
                }
                other => bail!("unknown line {other}"),
            }
        }
        tables.insert((family, table), chains);
        *self.generation.lock().unwrap() += 1;
        Ok(())
    }
}

/// A stand-in for `ipset` (tests only): sets kept in memory as (header words, member
/// lines); `restore` applies lines in order and stops at the first failure, as the tool.
#[derive(Default)]
pub struct IpsetStandIn {
    /// Name → (family, members); `created` numbers each set's creation (its initval).
    pub sets: Mutex<BTreeMap<String, (String, Vec<String>)>>,
    created: Mutex<BTreeMap<String, u32>>,
    next: Mutex<u32>,
    /// Restores whose payload contains this fail (before changing anything).
    pub fail: Mutex<Option<String>>,
}

impl IpsetStandIn {
    /// Each set's members, sorted, for comparisons.
    pub fn dump(&self) -> BTreeMap<String, Vec<String>> {
        let sets = self.sets.lock().unwrap();
        sets.iter()
            .map(|(name, (_, members))| {
                let mut members = members.clone();
                members.sort();
                (name.clone(), members)
            })
            .collect()
    }
}

impl super::sets::Runner for IpsetStandIn {
    fn restore(&self, payload: &str) -> Result<()> {
        if self.fail.lock().unwrap().as_deref().is_some_and(|f| payload.contains(f)) {
            bail!("ipset restore: error in line 1 (stand-in)");
        }
        let mut sets = self.sets.lock().unwrap();
        for line in payload.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["create", name, _kind, "family", family, ..] => {
                    if sets.contains_key(*name) {
                        bail!("set {name} exists");
                    }
                    sets.insert(name.to_string(), (family.to_string(), Vec::new()));
                    let mut next = self.next.lock().unwrap();
                    *next += 1;
                    self.created.lock().unwrap().insert(name.to_string(), *next);
                }
                ["add", name, rest @ ..] => {
                    let Some((_, members)) = sets.get_mut(*name) else { bail!("no set {name}") };
                    members.push(rest.join(" "));
                }
                ["swap", a, b] => {
                    let (Some(x), Some(y)) = (sets.remove(*a), sets.remove(*b)) else {
                        bail!("no set to swap")
                    };
                    sets.insert(a.to_string(), y);
                    sets.insert(b.to_string(), x);
                    let mut created = self.created.lock().unwrap();
                    let (x, y) = (created.remove(*a).unwrap_or(0), created.remove(*b).unwrap_or(0));
                    created.insert(a.to_string(), y);
                    created.insert(b.to_string(), x);
                }
                ["destroy", name] => {
                    if sets.remove(*name).is_none() {
                        bail!("no set {name}");
                    }
                }
                ["flush", name] => sets.get_mut(*name).map(|(_, m)| m.clear()).unwrap_or_default(),
                _ => bail!("unknown line {line}"),
            }
        }
        Ok(())
    }

    fn list(&self, name: Option<&str>, headers_only: bool) -> Result<String> {
        let sets = self.sets.lock().unwrap();
        let mut out = String::new();
        for (set, (family, members)) in sets.iter().filter(|(n, _)| name.is_none_or(|want| want == *n)) {
            // The size: what the members' text takes (a comment lost changes it).
            let initval = self.created.lock().unwrap().get(set).copied().unwrap_or(0);
            let size: usize = members.iter().map(String::len).sum();
            out += &format!(
                "Name: {set}\nType: hash:net\nHeader: family {family} counters comment initval {initval:#x}\n\
                 Size in memory: {size}\nReferences: 0\nNumber of entries: {}\n",
                members.len()
            );
            if !headers_only {
                out += "Members:\n";
                out.extend(members.iter().map(|m| format!("{m}\n")));
            }
        }
        Ok(out)
    }
}
