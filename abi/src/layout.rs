//! The version of the pinned state, so a start can tell pins it can reuse from pins of
//! another layout (an upgrade or downgrade over a kept datapath).
//!
//! Reuse is decided per map: a pinned map is kept (contents and all) only when the layout
//! versions agree in meaning (see [`SAME_MEANING_SINCE`]) *and* the pinned map has the shape
//! (key and value size, capacity) this object declares. Anything else is
//! rebuilt from the desired state.

/// `Array<u32, 1>`, pinned: slot 0 holds the [`VERSION`] of the layout the pins have.
pub const MAP: &str = "LAYOUT";

/// This object's layout. Bump it when a map keeps its shape but changes meaning (a counter
/// renumbered, a key reinterpreted); pure additions (new maps, counters appended) only need
/// the shape check.
///
/// 1: policy generations (no `LAYOUT` map: a pin set without one is version 1).
/// 2: staged pipeline: `SETTINGS`, tunnel ingress counters appended.
/// 3: CGNAT prefixes in hash maps per prefix length with `CGNAT_PLAN` (the maps keep their
///    names and key sizes but change type: the shape check sets the tries aside).
/// 4: the prefix maps become arrays-of-maps of slot tables, one per generation; the plans
///    carry the table's size and longest probe.
pub const VERSION: u32 = 4;

/// The oldest layout whose maps mean the same as this one's where their shapes agree.
pub const SAME_MEANING_SINCE: u32 = 1;

/// The layout of a pin set that has maps but no `LAYOUT` map.
pub const UNVERSIONED: u32 = 1;
