//! Atomic policy changes, for every feature's maps.
//!
//! Each policy map exists twice (generation 0 and 1) and the `GENERATION` array says which
//! copy the programs read; a program reads it once per packet. A change:
//!
//! 1. writes the new state into the generation nobody reads (order does not matter there:
//!    deletes go first, so each map needs room for one policy only);
//! 2. flips `GENERATION`: one 4-byte store, so every packet sees the old policy or the new
//!    one, never a mix;
//! 3. waits until no program that read the old generation is still running (an RCU grace
//!    period, obtained by updating a map-of-maps, which makes the kernel wait for running
//!    programs before the syscall returns);
//! 4. writes the same change into the old generation, so both hold the new state again and
//!    the next change is again a delta.
//!
//! A failure in step 1 leaves the datapath untouched (the half-written generation is not
//! read, and the next change rewrites it from what it holds); a failure in step 4 leaves the
//! new state in force, and the next change repairs the copy.

use std::time::Instant;

use anyhow::{Context, Result};
use aya::{
    maps::{Array, ArrayOfMaps, MapData},
    Ebpf,
};
use tailgate_abi::generation::{MAP_ACTIVE, MAP_BARRIER};

/// What a map writer does to one generation.
pub trait GenerationWriter {
    /// Makes generation `generation`'s maps hold the desired state; returns how many entries
    /// it changed.
    fn write(&mut self, ebpf: &mut Ebpf, generation: u32) -> Result<usize>;
}

/// The update that waits for running programs. Taken out of the object at load.
pub struct Barrier {
    outer: ArrayOfMaps<MapData, Array<MapData, u32>>,
    inner: Array<MapData, u32>,
}

impl Barrier {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let map = ebpf.take_map(MAP_BARRIER).with_context(|| format!("map {MAP_BARRIER} missing"))?;
        let outer = ArrayOfMaps::try_from(map)?;
        let inner = Array::create(1, 0).context("creating the barrier's inner map")?;
        Ok(Self { outer, inner })
    }

    /// Returns once every program that was running when it was called has finished.
    pub fn wait_for_running_programs(&mut self) -> Result<()> {
        self.outer.set(0, &self.inner, 0).context("waiting for running programs (map-of-maps update)")?;
        Ok(())
    }
}

/// The generation the programs read.
pub fn active(ebpf: &Ebpf) -> Result<u32> {
    let map = ebpf.map(MAP_ACTIVE).with_context(|| format!("map {MAP_ACTIVE} missing"))?;
    let array: Array<&MapData, u32> = Array::try_from(map)?;
    Ok(array.get(&0, 0)? & 1)
}

fn set_active(ebpf: &mut Ebpf, generation: u32) -> Result<()> {
    let map = ebpf.map_mut(MAP_ACTIVE).with_context(|| format!("map {MAP_ACTIVE} missing"))?;
    let mut array: Array<&mut MapData, u32> = Array::try_from(map)?;
    array.set(0, generation, 0).context("switching the policy generation")?;
    Ok(())
}

/// What a swap did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Swap {
    /// Entries the change wrote into the generation that became active.
    pub changed: usize,
    /// The generation now active.
    pub active: u32,
    /// How long the wait for running programs took.
    pub grace: std::time::Duration,
}

/// Applies every writer's change atomically as seen by the programs (see the module doc).
pub fn swap(
    ebpf: &mut Ebpf,
    barrier: &mut Barrier,
    writers: &mut [&mut dyn GenerationWriter],
) -> Result<Swap> {
    let old = active(ebpf)?;
    let new = old ^ 1;
    let mut changed = 0;
    for writer in writers.iter_mut() {
        changed += writer.write(ebpf, new).context("writing the inactive policy generation")?;
    }
    set_active(ebpf, new)?;
    let waited = Instant::now();
    barrier.wait_for_running_programs()?;
    let grace = waited.elapsed();
    for writer in writers.iter_mut() {
        if let Err(e) = writer.write(ebpf, old) {
            // The new policy is in force; the next change rewrites this copy from what it holds.
            tracing::warn!("bringing the standby policy generation up to date: {e:#}");
        }
    }
    Ok(Swap { changed, active: new, grace })
}
