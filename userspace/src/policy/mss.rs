//! MSS clamping of TCP SYN and SYN-ACK crossing the tunnel, both directions.

use crate::config::{MssClamp, MssConfig};

/// IPv4 + TCP headers without options.
const V4_HEADERS: u32 = 40;
/// IPv6 + TCP headers without options.
const V6_HEADERS: u32 = 60;
/// The least MSS Linux uses (TCP_MIN_MSS); a tunnel MTU leaving less is not clamped to.
const MIN_MSS: u32 = 88;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mss {
    Off,
    /// The same MSS for both families.
    Fixed(u16),
    /// Whatever fits the tunnel's MTU; `mtu` is `None` while the tunnel is absent.
    Pmtu {
        mtu: Option<u32>,
    },
}

impl Mss {
    /// The highest MSS let through, (IPv4, IPv6); `None`: no clamp to enforce now.
    pub fn limits(&self) -> Option<(u16, u16)> {
        let fit = |mtu: u32, headers: u32| u16::try_from(mtu.saturating_sub(headers)).unwrap_or(u16::MAX);
        match *self {
            Mss::Off | Mss::Pmtu { mtu: None } => None,
            // An MTU that small is bogus (xt_TCPMSS refuses it too): no clamp to zero.
            Mss::Pmtu { mtu: Some(mtu) } if mtu < V6_HEADERS + MIN_MSS => None,
            Mss::Fixed(mss) => Some((mss, mss)),
            Mss::Pmtu { mtu: Some(mtu) } => Some((fit(mtu, V4_HEADERS), fit(mtu, V6_HEADERS))),
        }
    }
}

pub fn compile(config: &MssConfig, tunnel_mtu: Option<u32>) -> Mss {
    match config.clamp {
        MssClamp::Off => Mss::Off,
        MssClamp::Fixed(mss) => Mss::Fixed(mss),
        MssClamp::Pmtu => Mss::Pmtu { mtu: tunnel_mtu },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_tunnel_mtu() {
        let pmtu = MssConfig { clamp: MssClamp::Pmtu };
        assert_eq!(compile(&pmtu, Some(1280)).limits(), Some((1240, 1220)));
        assert_eq!(compile(&pmtu, Some(1500)).limits(), Some((1460, 1440)));
        assert_eq!(compile(&pmtu, None).limits(), None, "tunnel absent: nothing to clamp through");
        assert_eq!(compile(&pmtu, Some(20)).limits(), None, "bogus MTU: no clamp to zero");
        assert_eq!(compile(&pmtu, Some(148)).limits(), Some((108, 88)));
        assert_eq!(
            compile(&MssConfig { clamp: MssClamp::Fixed(1200) }, Some(1280)).limits(),
            Some((1200, 1200))
        );
        assert_eq!(compile(&MssConfig { clamp: MssClamp::Off }, Some(1280)).limits(), None);
    }
}
