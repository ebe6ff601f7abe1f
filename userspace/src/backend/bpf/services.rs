//! Services in the BPF backend (see `tailgate_abi::services`): the services of each policy
//! generation, their Maglev tables and the backend ids.
//!
//! A service whose table did not change (same digest) keeps it; a changed one gets a new
//! table in a free slot, filled whole before the generation that points to it becomes
//! active. Tables and backend ids no generation uses any more are freed in the second half
//! of a swap (after the wait for running programs). Backend ids are stable per (service,
//! backend address), so a flow keeps its backend while that backend stays in the service.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    sync::Arc,
};

use anyhow::{Context, Result};
use aya::{
    maps::{Array, ArrayOfMaps, HashMap as BpfHashMap, MapData, MapError},
    Ebpf,
};
use tailgate_abi::services::{
    family, scope, Backend, Service, ServiceKey, MAP_BACKENDS, MAP_SERVICES, MAP_TABLES, MAX_BACKENDS,
    MAX_TABLES, TABLE_FLAGS,
};

use super::{generation::GenerationWriter, mapped::Mapped, sys};
use crate::{
    config::{BackendConfig, Protocol, ServiceConfig},
    policy::{
        proxy::{Egress, Ingress, Proxy},
        services::{self as policy, Services},
    },
};

/// A service's key without its generation: what identifies it across generations.
type Ident = ServiceKey;

/// The services' maps as this process knows them.
#[derive(Default)]
pub struct ServiceMaps {
    desired: Services,
    /// Set to write back entries read earlier (a roll-back), instead of `desired`.
    restore: Option<HashMap<Ident, Service>>,
    /// What each generation's `SERVICES` entries hold; read from the maps once.
    held: Option<[HashMap<Ident, Service>; 2]>,
    /// Backend ids by (service, backend address), and the ids taken.
    ids: HashMap<(Ident, SocketAddr), u32>,
    taken: HashSet<u32>,
    next_id: u32,
    /// Entries to keep the tables of until the start commits (to roll back to), and the
    /// backend ids there were then (those tables name no others).
    pinned: Option<HashMap<Ident, Service>>,
    pinned_ids: HashSet<u32>,
}

impl ServiceMaps {
    pub fn set_desired(&mut self, services: &Services, proxy: &Proxy) {
        self.desired = if proxy.ingress.is_none() && proxy.egress.is_none() {
            services.clone()
        } else {
            let mut all = services.as_ref().clone();
            all.extend(proxy.ingress.iter().flat_map(ingress_entries));
            all.extend(proxy.egress.iter().flat_map(egress_entries));
            Arc::new(all)
        };
        self.restore = None;
    }

    /// The entries of generation `generation`, to roll back to; their tables stay until
    /// `unpin`.
    pub fn snapshot(&mut self, ebpf: &Ebpf, generation: u32) -> Result<()> {
        self.load(ebpf)?;
        let entries = self.held.as_ref().map(|h| h[generation as usize & 1].clone()).unwrap_or_default();
        self.pinned = Some(entries);
        self.pinned_ids = self.taken.clone();
        Ok(())
    }

    /// Writes the snapshot back at the next swap.
    pub fn restore_snapshot(&mut self) {
        self.restore = self.pinned.clone();
    }

    /// The start committed: the snapshot's tables and backend ids go where no generation
    /// uses them (the start's swap already waited for programs reading the old ones).
    pub fn unpin(&mut self, ebpf: &mut Ebpf) -> Result<()> {
        let Some(pinned) = self.pinned.take() else { return Ok(()) };
        self.pinned_ids.clear();
        let before: HashSet<u32> = pinned.values().map(|s| s.table).collect();
        self.free_unused(ebpf, &before)
    }

    fn load(&mut self, ebpf: &Ebpf) -> Result<()> {
        if self.held.is_some() {
            return Ok(());
        }
        let map = ebpf.map(MAP_SERVICES).with_context(|| format!("map {MAP_SERVICES} missing"))?;
        let services: BpfHashMap<&MapData, ServiceKey, Service> = BpfHashMap::try_from(map)?;
        let mut held = [HashMap::new(), HashMap::new()];
        for entry in services.iter() {
            let (key, service) = entry?;
            held[usize::from(key.generation & 1)].insert(ident(&key), service);
        }
        // Ids are read back only where services are (a start without any — most — spends
        // no 65,535 lookups; an id a failed change left behind is simply written over).
        let map = ebpf.map(MAP_BACKENDS).with_context(|| format!("map {MAP_BACKENDS} missing"))?;
        let backends: Array<&MapData, Backend> = Array::try_from(map)?;
        let ids = if held.iter().all(HashMap::is_empty) { 0 } else { MAX_BACKENDS };
        for id in 1..ids {
            let backend = backends.get(&id, 0)?;
            if backend.family != 0 {
                self.ids.insert((ident(&backend.service), socket_addr(&backend)), id);
                self.taken.insert(id);
            }
        }
        self.held = Some(held);
        // Hand out ids after the highest one in use, as the process that wrote them would
        // have (an id freed recently is not handed out again soon).
        self.next_id = self.taken.iter().copied().max().unwrap_or(0);
        Ok(())
    }

    /// A backend id for `address` in service `service` (the one it had, or a free one,
    /// written to `BACKENDS`).
    fn id(&mut self, ebpf: &mut Ebpf, service: &Ident, address: SocketAddr) -> Result<u32> {
        if let Some(&id) = self.ids.get(&(*service, address)) {
            return Ok(id);
        }
        // Round robin over free ids: an id freed by one change is not handed out again
        // soon (a flow still naming it is then balanced again, not sent elsewhere).
        let mut id = self.next_id;
        for _ in 0..MAX_BACKENDS {
            id = if id + 1 >= MAX_BACKENDS { 1 } else { id + 1 };
            if !self.taken.contains(&id) {
                break;
            }
        }
        anyhow::ensure!(
            !self.taken.contains(&id) && id != 0,
            "no free backend id (all {MAX_BACKENDS} in use)"
        );
        let map = ebpf.map_mut(MAP_BACKENDS).with_context(|| format!("map {MAP_BACKENDS} missing"))?;
        let mut backends: Array<&mut MapData, Backend> = Array::try_from(map)?;
        backends.set(id, backend(service, address), 0).with_context(|| format!("writing {MAP_BACKENDS}"))?;
        self.next_id = id;
        self.taken.insert(id);
        self.ids.insert((*service, address), id);
        Ok(id)
    }

    /// Builds `service`'s table (not installed yet).
    fn build(&mut self, ebpf: &mut Ebpf, key: &Ident, service: &ServiceConfig, slot: u32) -> Result<MapData> {
        let ids: Vec<u32> =
            service.backends.iter().map(|b| self.id(ebpf, key, b.address)).collect::<Result<_>>()?;
        let table: Vec<u32> = policy::table(service).into_iter().map(|i| ids[i as usize]).collect();
        let inner = create_table(table.len().div_ceil(2) as u32, slot)?;
        fill_table(&inner, &table)
            .with_context(|| format!("filling the table of {}", policy::describe(service)))?;
        Ok(inner)
    }

    fn slots_in_use(&self) -> HashSet<u32> {
        let held = self.held.iter().flat_map(|h| h.iter().flat_map(|g| g.values()));
        let pinned = self.pinned.iter().flat_map(|p| p.values());
        held.chain(pinned).map(|s| s.table).collect()
    }

    /// Frees what no generation (nor the snapshot) uses: tables, backend ids.
    fn free_unused(&mut self, ebpf: &mut Ebpf, before: &HashSet<u32>) -> Result<()> {
        let used = self.slots_in_use();
        let Some(aya::maps::Map::ArrayOfMaps(outer)) = ebpf.map(MAP_TABLES) else {
            anyhow::bail!("map {MAP_TABLES} missing or not an array of maps");
        };
        let gone: Vec<u32> = before.difference(&used).copied().collect();
        if !gone.is_empty() {
            // One wait for running programs for all of them (see `install`).
            if let Err(batch) = sys::map_delete_batch(outer.fd().as_fd(), &gone) {
                tracing::debug!("batch delete of service tables: {batch}; one by one");
                for slot in &gone {
                    match sys::map_delete(outer.fd().as_fd(), slot) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => return Err(e).with_context(|| format!("freeing table slot {slot}")),
                    }
                }
            }
        }
        // Ids of backends no service has any more (the snapshot's stay: a roll-back's
        // tables name them).
        let wanted: HashSet<(Ident, SocketAddr)> = self
            .desired
            .iter()
            .flat_map(|s| {
                let key = key_of(s);
                s.backends.iter().map(move |b| (key, b.address))
            })
            .collect();
        let stale: Vec<u32> = self
            .ids
            .iter()
            .filter(|(k, id)| !wanted.contains(k) && !self.pinned_ids.contains(id))
            .map(|(_, &id)| id)
            .collect();
        self.release(ebpf, &stale)
    }

    /// Clears backend ids in `BACKENDS` and forgets them.
    fn release(&mut self, ebpf: &mut Ebpf, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let map = ebpf.map_mut(MAP_BACKENDS).with_context(|| format!("map {MAP_BACKENDS} missing"))?;
        let mut backends: Array<&mut MapData, Backend> = Array::try_from(map)?;
        for &id in ids {
            backends.set(id, Backend::default(), 0).with_context(|| format!("clearing {MAP_BACKENDS}"))?;
            self.taken.remove(&id);
        }
        let released: HashSet<u32> = ids.iter().copied().collect();
        self.ids.retain(|_, id| !released.contains(id));
        Ok(())
    }
}

impl GenerationWriter for ServiceMaps {
    fn write(&mut self, ebpf: &mut Ebpf, generation: u32) -> Result<usize> {
        self.load(ebpf)?;
        let gen = generation as usize & 1;
        let before = self.slots_in_use();
        let held = self.held.take().unwrap_or_default();
        let ids_before = self.taken.clone();
        let changed = match self.write_generation(ebpf, gen, held) {
            Ok(changed) => changed,
            Err(e) => {
                // Ids this write handed out name backends no generation uses: gone again,
                // or the next change would find them taken.
                let fresh: Vec<u32> = self.taken.difference(&ids_before).copied().collect();
                if let Err(undo) = self.release(ebpf, &fresh) {
                    tracing::warn!("releasing backend ids of a failed change: {undo:#}");
                }
                return Err(e);
            }
        };
        // Both generations agree (the second half of a swap): what neither uses can go; no
        // program reads it any more (the swap waited for running programs before).
        if self.held.as_ref().is_some_and(|h| h[0] == h[1]) {
            self.free_unused(ebpf, &before)?;
        }
        Ok(changed)
    }
}

impl ServiceMaps {
    fn write_generation(
        &mut self,
        ebpf: &mut Ebpf,
        gen: usize,
        mut held: [HashMap<Ident, Service>; 2],
    ) -> Result<usize> {
        let outcome = (|| -> Result<usize> {
            let mut changed = 0;
            let desired: Vec<(Ident, Result<Service, ServiceConfig>)> = match &self.restore {
                Some(entries) => entries.iter().map(|(k, s)| (*k, Ok(*s))).collect(),
                None => self.desired.iter().map(|s| (key_of(s), Err(s.clone()))).collect(),
            };
            // Slots in use (both generations, the snapshot); new tables take free ones.
            let mut used: HashSet<u32> = held
                .iter()
                .flat_map(|g| g.values())
                .chain(self.pinned.iter().flat_map(|p| p.values()))
                .map(|s| s.table)
                .collect();
            let mut free = 0..MAX_TABLES;
            let mut tables: Vec<(u32, MapData)> = Vec::new();
            let mut entries: Vec<(Ident, Service)> = Vec::new();
            let mut keep = HashSet::new();
            for (ident, want) in desired {
                keep.insert(ident);
                let entry = match want {
                    Ok(entry) => entry,
                    Err(config) => {
                        let digest = policy::digest(&config);
                        if held[gen].get(&ident).is_some_and(|s| s.digest == digest) {
                            continue;
                        }
                        let table = match held[gen ^ 1].get(&ident).filter(|s| s.digest == digest) {
                            Some(other) => other.table,
                            None => {
                                let slot = free.find(|s| !used.contains(s)).context("no free table slot")?;
                                used.insert(slot);
                                tables.push((slot, self.build(ebpf, &ident, &config, slot)?));
                                slot
                            }
                        };
                        Service { table, size: config.table_size, digest }
                    }
                };
                if held[gen].get(&ident) != Some(&entry) {
                    entries.push((ident, entry));
                }
            }
            install(ebpf, &tables)?;
            for (ident, entry) in entries {
                services_map(ebpf)?
                    .insert(with_generation(&ident, gen), entry, 0)
                    .with_context(|| format!("writing {MAP_SERVICES}"))?;
                held[gen].insert(ident, entry);
                changed += 1;
            }
            let stale: Vec<Ident> = held[gen].keys().filter(|k| !keep.contains(k)).copied().collect();
            for ident in stale {
                match services_map(ebpf)?.remove(&with_generation(&ident, gen)) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(e).with_context(|| format!("removing from {MAP_SERVICES}")),
                }
                held[gen].remove(&ident);
                changed += 1;
            }
            Ok(changed)
        })();
        self.held = Some(held);
        outcome
    }
}

fn services_map(ebpf: &mut Ebpf) -> Result<BpfHashMap<&mut MapData, ServiceKey, Service>> {
    let map = ebpf.map_mut(MAP_SERVICES).with_context(|| format!("map {MAP_SERVICES} missing"))?;
    Ok(BpfHashMap::try_from(map)?)
}

/// The ingress proxy as services the kernel knows: port 0 (any port of the gateway's
/// tailnet address, found when no service has the packet's port) to one backend of port 0
/// (the packet's port kept), TCP, UDP and ICMP echo (the identifier kept).
fn ingress_entries(ingress: &Ingress) -> [ServiceConfig; 3] {
    proxy_entries("ingress-proxy", ingress.from, ingress.to, false)
}

/// The egress proxy's DNAT the same way, on each of the gateway's addresses, for traffic
/// arriving on an uplink only (scope `UPLINKS`).
fn egress_entries(egress: &Egress) -> impl Iterator<Item = ServiceConfig> + '_ {
    egress.on.iter().flat_map(|on| proxy_entries("egress-proxy", *on, egress.to, true))
}

fn proxy_entries(name: &str, from: IpAddr, to: IpAddr, uplinks_only: bool) -> [ServiceConfig; 3] {
    [Protocol::Tcp, Protocol::Udp, Protocol::IcmpEcho].map(|protocol| ServiceConfig {
        name: name.into(),
        listen: SocketAddr::new(from, 0),
        protocol,
        backends: vec![BackendConfig { address: SocketAddr::new(to, 0), weight: 1 }],
        table_size: PROXY_TABLE_SIZE,
        uplinks_only,
    })
}

/// One backend: the smallest prime table.
const PROXY_TABLE_SIZE: u32 = 2;

/// The key of a service (generation 0).
pub fn key_of(service: &ServiceConfig) -> Ident {
    let (addr, family) = addr_bytes(service.listen.ip());
    ServiceKey {
        addr,
        port: service.listen.port(),
        proto: service.protocol.number(service.listen.is_ipv4()),
        family,
        generation: 0,
        scope: if service.uplinks_only { scope::UPLINKS } else { scope::ANY },
        pad: [0; 2],
    }
}

fn ident(key: &ServiceKey) -> Ident {
    ServiceKey { generation: 0, ..*key }
}

fn with_generation(key: &Ident, gen: usize) -> ServiceKey {
    ServiceKey { generation: gen as u8, ..*key }
}

/// An address as the maps hold it (IPv4 in the first 4 bytes), and its family.
pub fn addr_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    let mut addr = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            (addr, family::V4)
        }
        IpAddr::V6(v6) => (v6.octets(), family::V6),
    }
}

fn backend(service: &Ident, address: SocketAddr) -> Backend {
    let (addr, family) = addr_bytes(address.ip());
    Backend { addr, port: address.port(), family, pad: 0, service: *service }
}

fn socket_addr(backend: &Backend) -> SocketAddr {
    let ip = if backend.family == family::V4 {
        IpAddr::from([backend.addr[0], backend.addr[1], backend.addr[2], backend.addr[3]])
    } else {
        IpAddr::from(backend.addr)
    };
    SocketAddr::new(ip, backend.port)
}

/// Puts new tables in their slots. Each update of an array of maps makes the kernel wait
/// for running programs (an RCU grace period, ~10 ms): one batch waits once (10,000 tables
/// one by one took 90 s). One by one where the kernel has no batch for it.
fn install(ebpf: &mut Ebpf, tables: &[(u32, MapData)]) -> Result<()> {
    if tables.is_empty() {
        return Ok(());
    }
    let map = ebpf.map_mut(MAP_TABLES).with_context(|| format!("map {MAP_TABLES} missing"))?;
    let aya::maps::Map::ArrayOfMaps(data) = &*map else {
        anyhow::bail!("map {MAP_TABLES} is not an array of maps");
    };
    let slots: Vec<u32> = tables.iter().map(|(slot, _)| *slot).collect();
    let fds: Vec<u32> = tables.iter().map(|(_, map)| map.fd().as_fd().as_raw_fd() as u32).collect();
    if let Err(batch) = sys::map_update_batch(data.fd().as_fd(), &slots, &fds) {
        tracing::debug!("batch update of service tables: {batch}; one by one");
        let mut outer: ArrayOfMaps<&mut MapData, MapData> = ArrayOfMaps::try_from(map)?;
        for (slot, map) in tables {
            outer.set(*slot, map, 0).with_context(|| format!("installing a table in {MAP_TABLES}"))?;
        }
    }
    Ok(())
}

/// A new table (`BPF_F_MMAPABLE` array of backend id pairs) of `size` elements.
fn create_table(size: u32, slot: u32) -> Result<MapData> {
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let def = aya_obj::Map::new_from_params(BPF_MAP_TYPE_ARRAY, 4, 8, size, TABLE_FLAGS);
    MapData::create(def, &format!("maglev_{slot}"), None)
        .with_context(|| format!("creating a service table of {size} entries"))
}

/// Writes `values` (the slots) into a fresh table through a memory mapping: slot `i` is
/// half `i % 2` of element `i / 2`.
fn fill_table(map: &MapData, values: &[u32]) -> Result<()> {
    let mut mapped = Mapped::<[u32; 2]>::new(map, true)?;
    for (element, pair) in mapped.elements_mut().iter_mut().zip(values.chunks(2)) {
        element[..pair.len()].copy_from_slice(pair);
    }
    Ok(())
}

/// A table's `size` slots, read through a memory mapping (not one call per slot).
fn read_table(map: &MapData, size: u32) -> Result<Vec<u32>> {
    let mapped = Mapped::<[u32; 2]>::new(map, false)?;
    let slots: Vec<u32> = mapped.elements().iter().flatten().copied().take(size as usize).collect();
    anyhow::ensure!(slots.len() == size as usize, "a table of {} slots for {size}", slots.len());
    Ok(slots)
}

/// Names of the services' maps (pinned: flows keep their backends across restarts).
pub fn map_names() -> [&'static str; 3] {
    [MAP_SERVICES, MAP_TABLES, MAP_BACKENDS]
}

/// A service as the maps hold it, for `tailgate status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceStatus {
    pub listen: String,
    pub protocol: &'static str,
    pub table_size: u32,
    /// Only for traffic arriving by an uplink (the egress proxy's entries).
    pub uplinks_only: bool,
    pub backends: Vec<BackendShare>,
}

/// A backend and the share of its service's table slots it holds (so of new flows).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendShare {
    pub address: String,
    pub slots: u32,
}

/// The services of generation `generation` in the pinned maps.
pub fn read(
    services: &aya::maps::Map,
    tables: &aya::maps::Map,
    backends: &aya::maps::Map,
    generation: u32,
) -> Result<Vec<ServiceStatus>> {
    let services: BpfHashMap<&MapData, ServiceKey, Service> = BpfHashMap::try_from(services)?;
    let tables: ArrayOfMaps<&MapData, MapData> = ArrayOfMaps::try_from(tables)?;
    let backends: Array<&MapData, Backend> = Array::try_from(backends)?;
    let mut out = Vec::new();
    for entry in services.iter() {
        let (key, service) = entry?;
        if u32::from(key.generation) != generation & 1 {
            continue;
        }
        let table = read_table(&tables.get(&service.table, 0)?, service.size)?;
        let mut slots: HashMap<u32, u32> = HashMap::new();
        for id in table {
            *slots.entry(id).or_default() += 1;
        }
        let mut shares: Vec<BackendShare> = slots
            .into_iter()
            .map(|(id, slots)| {
                Ok(BackendShare { address: socket_addr(&backends.get(&id, 0)?).to_string(), slots })
            })
            .collect::<Result<_>>()?;
        shares.sort_by(|a, b| a.address.cmp(&b.address));
        let listen = SocketAddr::new(
            socket_addr(&Backend { addr: key.addr, family: key.family, ..Default::default() }).ip(),
            key.port,
        );
        out.push(ServiceStatus {
            listen: listen.to_string(),
            protocol: match key.proto {
                6 => "tcp",
                17 => "udp",
                _ => "icmp",
            },
            table_size: service.size,
            uplinks_only: key.scope == scope::UPLINKS,
            backends: shares,
        });
    }
    out.sort_by(|a, b| (&a.listen, a.protocol, a.uplinks_only).cmp(&(&b.listen, b.protocol, b.uplinks_only)));
    Ok(out)
}
