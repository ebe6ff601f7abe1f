//! Subnet-route mark: packets arriving from the tunnel get the configured bits under the
//! configured mask; the other bits of the mark are kept (a mark set by another program or a
//! `tc` filter before ours stays).

use tailgate_abi::settings::{stage, Settings};

use crate::stage::Rewrite;

/// The mark to set on a packet from the tunnel whose mark is `current`; `None` when the
/// stage is off.
#[inline(always)]
pub fn from_tunnel(current: u32, settings: &Settings) -> Option<Rewrite> {
    if settings.stages & stage::MARK == 0 {
        return None;
    }
    let marked = (current & !settings.mark_mask) | settings.mark_value;
    Some(Rewrite::Mark(marked))
}
