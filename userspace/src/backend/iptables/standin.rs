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
}

const BUILTIN: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

impl StandIn {
    /// Adds a rule of someone else's (or an earlier run's) to `chain`, creating it.
    pub fn append(&self, family: Family, table: Table, chain: &str, body: &str) {
        let mut tables = self.tables.lock().unwrap();
        let chains = tables.entry((family, table)).or_insert_with(fresh);
        chains.entry(chain.to_string()).or_insert_with(|| ("-".into(), Vec::new())).1.push(body.to_string());
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
        Ok(())
    }
}
