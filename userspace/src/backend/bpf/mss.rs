//! MSS clamp in the kernel: the limits per family in `SETTINGS`; the tunnel programs
//! (ingress and egress) clamp SYNs above them.

use tailgate_abi::settings::{stage, Settings};

use crate::policy::Mss;

pub fn fill(mss: &Mss, settings: &mut Settings) {
    if let Some((v4, v6)) = mss.limits() {
        settings.stages |= stage::MSS;
        settings.mss_v4 = v4;
        settings.mss_v6 = v6;
    }
}
