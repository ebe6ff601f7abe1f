//! The `SETTINGS` array: the parameters of the stages that have no table of their own, one
//! entry per policy generation, so they switch together with the prefix rules. Each
//! feature fills its part (`subnet_routes`, `mss`, `masquerade`, ...).

use anyhow::{Context, Result};
use aya::{
    maps::{Array, MapData},
    Ebpf,
};
use tailgate_abi::settings::{Settings, MAP};

use super::{conntrack, generation::GenerationWriter, masquerade, mss, proxy, subnet_routes};
use crate::policy::DesiredState;

/// What the kernel stages need of `state`.
pub fn compile(state: &DesiredState) -> Settings {
    let mut settings = Settings::default();
    subnet_routes::fill(&state.subnet_routes, &mut settings);
    mss::fill(&state.mss, &mut settings);
    conntrack::fill(&state.conntrack, &mut settings);
    proxy::fill(state, &mut settings);
    masquerade::fill(state, &mut settings);
    settings
}

/// Writes the desired settings into a generation.
#[derive(Default)]
pub struct SettingsMap {
    pub desired: Settings,
}

impl SettingsMap {
    /// What generation `generation` holds.
    pub fn read(ebpf: &Ebpf, generation: u32) -> Result<Settings> {
        let map = ebpf.map(MAP).with_context(|| format!("map {MAP} missing"))?;
        let array: Array<&MapData, Settings> = Array::try_from(map)?;
        Ok(array.get(&(generation & 1), 0)?)
    }
}

impl GenerationWriter for SettingsMap {
    fn write(&mut self, ebpf: &mut Ebpf, generation: u32) -> Result<usize> {
        if Self::read(ebpf, generation)? == self.desired {
            return Ok(0);
        }
        let map = ebpf.map_mut(MAP).with_context(|| format!("map {MAP} missing"))?;
        let mut array: Array<&mut MapData, Settings> = Array::try_from(map)?;
        array.set(generation & 1, self.desired, 0).with_context(|| format!("writing {MAP}"))?;
        Ok(1)
    }
}
