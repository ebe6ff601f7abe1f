//! tailgate's kernel programs. Entry points only; each concern lives in its own module.
//!
//! The crate builds only for `bpfel-unknown-none` (see `userspace/build.rs`); on the host it
//! is an empty binary so `cargo clippy --workspace` and `cargo test --workspace` work.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod cgnat;
#[cfg(target_arch = "bpf")]
mod counters;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };
    use tailgate_abi::verdict;

    use crate::{cgnat, parse};

    /// XDP on every uplink: drops packets whose source is in a filtered range (CGNAT,
    /// tailnet ULA) unless the policy exempts it.
    #[xdp]
    pub fn tg_uplink(ctx: XdpContext) -> u32 {
        let packet = parse::ethernet(ctx.data(), ctx.data_end());
        match cgnat::uplink_verdict(&ctx, &packet) {
            verdict::DROP => xdp_action::XDP_DROP,
            _ => xdp_action::XDP_PASS,
        }
    }

    /// TC egress on the tunnel: drops forwarded packets with a filtered source that did not
    /// come in through the tunnel (reference rule ts-forward 3).
    #[classifier]
    pub fn tg_tunnel_egress(ctx: TcContext) -> i32 {
        match cgnat::tunnel_egress_verdict(&ctx) {
            verdict::DROP => TC_ACT_SHOT as i32,
            _ => TC_ACT_OK as i32,
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
