//! Pins of another layout (an upgrade or downgrade over a kept datapath, see
//! `tailgate_abi::layout`). Before the object is loaded, every pinned map this version
//! cannot reuse as it is (other layout version, other shape) is set aside, so the load
//! creates it anew and the start fills it from the desired state; the links then switch to
//! the new programs atomically (`links::take_over`), with no moment without a program. The
//! maps set aside go at commit, or come back when the start fails before any program was
//! replaced.

use std::path::PathBuf;

use anyhow::{Context, Result};
use aya::{
    maps::{Array, Map, MapData, MapInfo},
    Ebpf,
};
use tailgate_abi::layout::{MAP, SAME_MEANING_SINCE, UNVERSIONED, VERSION};

use super::{pins, Pins, OBJECT};

/// Maps set aside: (pin path, where it waits).
#[derive(Debug, Default)]
pub struct Stash(Vec<(PathBuf, PathBuf)>);

impl Stash {
    /// Whether map `name` was set aside.
    pub fn holds(&self, name: &str) -> bool {
        self.0.iter().any(|(pin, _)| pin.file_name().is_some_and(|f| f == name))
    }

    /// The start failed before a program was replaced: the old programs still use these.
    pub fn put_back(self) {
        for (pin, stale) in self.0 {
            let _ = pins::remove_file(&pin);
            if let Err(e) = std::fs::rename(&stale, &pin) {
                tracing::warn!("putting {} back: {e}", pin.display());
            }
        }
    }

    /// The new programs run: the old maps go.
    pub fn discard(self) {
        for (_, stale) in self.0 {
            if let Err(e) = pins::remove_file(&stale) {
                tracing::warn!("{e:#}");
            }
        }
    }
}

/// The layout version of the pins under `pins`; `None` when no map is pinned there.
pub fn pinned_version(pins: &Pins, maps: &[&str]) -> Result<Option<u32>> {
    let path = pins.map(MAP);
    if path.exists() {
        let map = Map::from_map_data(
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?,
        )?;
        let array: Array<&MapData, u32> = Array::try_from(&map)?;
        // 0: a load that failed before recording its version (aya pins maps as it creates
        // them); the maps beside it are whatever was there before.
        return Ok(Some(match array.get(&0, 0)? {
            0 => UNVERSIONED,
            version => version,
        }));
    }
    Ok(maps.iter().any(|name| pins.map(name).exists()).then_some(UNVERSIONED))
}

/// Sets aside every pinned map of `maps` this object cannot reuse; `sizes` are capacities
/// the load sets instead of the object's.
pub fn set_aside_incompatible(pins: &Pins, maps: &[&str], sizes: &[(&str, u32)]) -> Result<Stash> {
    let Some(version) = pinned_version(pins, maps)? else { return Ok(Stash::default()) };
    let object = aya_obj::Object::parse(OBJECT).context("parsing the eBPF object")?;
    let mut stash = Stash::default();
    if let Err(e) = set_aside(pins, maps, sizes, version, &object, &mut stash) {
        // Half-way: what was set aside goes back under its name.
        stash.put_back();
        return Err(e);
    }
    Ok(stash)
}

fn set_aside(
    pins: &Pins,
    maps: &[&str],
    sizes: &[(&str, u32)],
    version: u32,
    object: &aya_obj::Object,
    stash: &mut Stash,
) -> Result<()> {
    let same_meaning = (SAME_MEANING_SINCE..=VERSION).contains(&version);
    for &name in maps {
        let pin = pins.map(name);
        if !pin.exists() {
            continue;
        }
        let why = if !same_meaning {
            Some(format!("layout {version}, this version has {VERSION}"))
        } else {
            let want =
                object.maps.get(name).with_context(|| format!("map {name} missing from the object"))?;
            let have = MapInfo::from_pin(&pin).with_context(|| format!("reading {}", pin.display()))?;
            let shape = |t: u32, f: u32, k: u32, v: u32, n: u32| {
                format!("type {t}, flags {f:#x}, key {k} B, value {v} B, {n} entries")
            };
            let have_type = have.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
            let entries = sizes.iter().find(|(n, _)| *n == name).map_or(want.max_entries(), |(_, n)| *n);
            let (want, have) = (
                shape(want.map_type(), want.map_flags(), want.key_size(), want.value_size(), entries),
                shape(have_type, have.map_flags(), have.key_size(), have.value_size(), have.max_entries()),
            );
            (want != have).then(|| format!("pinned with {have}, this version needs {want}"))
        };
        if let Some(why) = why {
            let stale = pins.stale_map(name);
            pins::remove_file(&stale)?;
            std::fs::rename(&pin, &stale).with_context(|| format!("setting {} aside", pin.display()))?;
            tracing::info!("map {name}: {why}; rebuilt from the configuration");
            stash.0.push((pin, stale));
        }
    }
    Ok(())
}

/// Records this object's layout in the pinned `LAYOUT` map.
pub fn record(ebpf: &mut Ebpf) -> Result<()> {
    let map = ebpf.map_mut(MAP).with_context(|| format!("map {MAP} missing"))?;
    let mut array: Array<&mut MapData, u32> = Array::try_from(map)?;
    array.set(0, VERSION, 0).context("recording the layout version")?;
    Ok(())
}
