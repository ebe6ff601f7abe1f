//! Configuration: TOML file plus `TAILGATE_*` environment overrides, validated into typed
//! values. Every error names the field (or variable) it is about.

use std::{collections::HashMap, fmt, net::IpAddr, path::Path, str::FromStr, time::Duration};

use ipnet::IpNet;
use serde::Deserialize;

use crate::policy::{CGNAT_V4, TAILNET_ULA_V6};

pub mod nat;
pub mod proxy;
pub mod services;

pub use self::{
    nat::NatConfig,
    proxy::ProxyConfig,
    services::{BackendConfig, Protocol, ServiceConfig},
};

/// Longest Linux interface name (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;
/// Prefixes a user can list in `cgnat.allow` + `cgnat.drop`, leaving room for built-ins.
pub const MAX_USER_PREFIXES: usize = tailgate_abi::cgnat::MAX_POLICY_PREFIXES as usize - 16;
/// Largest config file read. The biggest valid policy (131,040 IPv6 prefixes written out)
/// is about 7 MiB; anything larger is a mistake (a log file passed as config, say).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The overlay's TUN interface.
    pub tunnel: String,
    /// Uplinks; `None` means every up interface but the tunnel and `lo`.
    pub interfaces: Option<Vec<String>>,
    pub backend: BackendKind,
    /// Leave the datapath attached when the daemon stops (the next start takes it over).
    pub keep_datapath: bool,
    /// Where to serve Prometheus metrics and `/healthz`; `None`: no listening socket.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub cgnat: CgnatConfig,
    pub subnet_routes: SubnetRoutesConfig,
    pub mss: MssConfig,
    pub flows: FlowsConfig,
    pub iptables: IptablesConfig,
    /// `[[service]]`, in the order given.
    pub services: Vec<ServiceConfig>,
    /// `[proxy]`.
    pub proxy: ProxyConfig,
    /// `[nat]`.
    pub nat: NatConfig,
    /// Where the list values came from, to name them in errors and rule origins.
    pub sources: ListSources,
}

/// The name a list had where it was given: the TOML key (`cgnat.allow`) or the environment
/// variable that overrode it (`TAILGATE_CGNAT_ALLOW`). Item `i` is named `<name>[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListSources {
    pub interfaces: &'static str,
    pub allow: &'static str,
    pub drop: &'static str,
    pub mark: &'static str,
    pub clamp: &'static str,
}

impl Default for ListSources {
    fn default() -> Self {
        Self {
            interfaces: "interfaces",
            allow: "cgnat.allow",
            drop: "cgnat.drop",
            mark: "subnet_routes.mark",
            clamp: "mss.clamp",
        }
    }
}

/// Settings of the iptables backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesConfig {
    /// Insert jumps from the built-in chains where missing; `false` leaves that to the user.
    pub divert: bool,
    pub variant: IptablesVariant,
    /// How often the rules are read back and repaired.
    pub repair_interval: Duration,
    pub hook_position: HookPosition,
}

/// Where tailgate's jumps from INPUT/FORWARD/POSTROUTING belong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookPosition {
    /// Inserted first where missing, then left where they are: rules others insert above
    /// them stay above (and are reported when they can accept what tailgate drops).
    Keep,
    /// Kept first: a repair moves a jump that is no longer the first rule back on top.
    First,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IptablesVariant {
    /// The one the host already uses (the one with rules), nft on a tie.
    Auto,
    Nft,
    Legacy,
}

/// Bounds of `iptables.repair_interval_ms`.
const REPAIR_INTERVAL_MS: std::ops::RangeInclusive<u64> = 50..=600_000;
const DEFAULT_REPAIR_INTERVAL_MS: u64 = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Auto,
    Bpf,
    Iptables,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgnatConfig {
    pub mode: CgnatMode,
    pub allow: Vec<IpNet>,
    pub drop: Vec<IpNet>,
    /// Let replies to the gateway's own connections through the inbound drop (flows are
    /// keyed to the uplink they left by).
    pub allow_replies: bool,
}

/// `[flows]`: the flow table's capacity per family (load-time: a change takes effect at the
/// next start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowsConfig {
    pub max_entries_v4: u32,
    pub max_entries_v6: u32,
}

impl Default for FlowsConfig {
    fn default() -> Self {
        use tailgate_abi::conntrack::{DEFAULT_ENTRIES_V4, DEFAULT_ENTRIES_V6};
        Self { max_entries_v4: DEFAULT_ENTRIES_V4, max_entries_v6: DEFAULT_ENTRIES_V6 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgnatMode {
    Drop,
    Off,
}

/// `[subnet_routes]`: what happens to traffic from the tunnel that the gateway forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetRoutesConfig {
    /// The mark bits set on it, under their mask.
    pub mark: Mark,
    /// SNAT it to the address of the interface it leaves by (not the tunnel).
    pub masquerade: bool,
    /// Forward into the tunnel from other devices only what belongs to a flow opened from
    /// the tunnel side (no new connections from the LAN into the tailnet).
    pub stateful: bool,
}

/// A packet mark: `value` under `mask` (`value` has no bits outside `mask`, and is not 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mark {
    pub value: u32,
    pub mask: u32,
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}/{:#x}", self.value, self.mask)
    }
}

/// `[mss]`: clamping the MSS of TCP SYN and SYN-ACK crossing the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MssConfig {
    pub clamp: MssClamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MssClamp {
    /// From the tunnel's MTU: MTU - 40 (IPv4), MTU - 60 (IPv6), followed when it changes.
    Pmtu,
    /// This MSS, both families.
    Fixed(u16),
    Off,
}

/// Fixed MSS values a TCP stack can use: every IPv4 host must accept 536 (RFC 9293); the
/// largest is an IPv4 packet of 65535 bytes with minimal headers.
pub const MSS_RANGE: std::ops::RangeInclusive<u16> = 536..=65495;

/// A configuration problem, with the field (`cgnat.allow[2]`) or variable it is about.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    tunnel: Option<String>,
    interfaces: Option<Vec<String>>,
    backend: Option<BackendKind>,
    keep_datapath: Option<bool>,
    metrics_listen: Option<String>,
    /// Where `metrics_listen` was given (for errors).
    #[serde(skip)]
    metrics_source: Option<&'static str>,
    #[serde(default)]
    cgnat: RawCgnat,
    #[serde(default)]
    subnet_routes: RawSubnetRoutes,
    #[serde(default)]
    mss: RawMss,
    #[serde(default)]
    flows: RawFlows,
    #[serde(default)]
    iptables: RawIptables,
    #[serde(default)]
    service: Vec<services::RawService>,
    #[serde(default)]
    proxy: proxy::RawProxy,
    #[serde(default)]
    nat: nat::RawNat,
    #[serde(skip)]
    sources: ListSources,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIptables {
    divert: Option<bool>,
    variant: Option<IptablesVariant>,
    repair_interval_ms: Option<u64>,
    hook_position: Option<HookPosition>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubnetRoutes {
    mark: Option<String>,
    masquerade: Option<bool>,
    stateful: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlows {
    max_entries_v4: Option<i64>,
    max_entries_v6: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMss {
    clamp: Option<RawClamp>,
}

/// `clamp = "pmtu"`, `"off"` or a number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawClamp {
    Number(i64),
    Word(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCgnat {
    mode: Option<CgnatMode>,
    allow: Option<Vec<String>>,
    drop: Option<Vec<String>>,
    allow_replies: Option<bool>,
}

/// The metrics listener's address: `host:port` with an IP address (no name to resolve).
fn metrics_listen(text: Option<String>, field: &str) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    let Some(text) = text else { return Ok(None) };
    let addr: std::net::SocketAddr = text.trim().parse().map_err(|_| {
        ConfigError::new(field, format!("{text:?} is not an address:port (e.g. \"127.0.0.1:9469\")"))
    })?;
    if addr.port() == 0 {
        return Err(ConfigError::new(field, "port 0: give the port to listen on"));
    }
    Ok(Some(addr))
}

impl Config {
    /// Reads `path` (if given) and applies the process environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let text = match path {
            Some(path) => read_limited(path)
                .map_err(|e| ConfigError::new(path.display().to_string(), format!("cannot read: {e}")))?,
            None => String::new(),
        };
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::parse(&text, &env)
    }

    /// Parses TOML text and applies overrides from `env`. Pure: no system state is read.
    pub fn parse(text: &str, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::new("config", e.message().to_string() + &span_hint(text, e.span())))?;
        apply_env(&mut raw, env)?;
        raw.validate()
    }

    /// Every prefix the user listed: the field it came from, the prefix, and whether it is
    /// allowed (`true`) or dropped.
    pub fn user_prefixes(&self) -> impl Iterator<Item = (Field, IpNet, bool)> + '_ {
        let allow = self.cgnat.allow.iter().enumerate();
        let drop = self.cgnat.drop.iter().enumerate();
        let (allow_name, drop_name) = (self.sources.allow, self.sources.drop);
        allow
            .map(move |(index, p)| (Field { list: allow_name, index }, *p, true))
            .chain(drop.map(move |(index, p)| (Field { list: drop_name, index }, *p, false)))
    }
}

/// An item of a config list, named as it was given: `cgnat.allow[2]` or
/// `TAILGATE_CGNAT_ALLOW[2]`. (No string per item: policies have 100,000s of them.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Field {
    pub list: &'static str,
    pub index: usize,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.list, self.index)
    }
}

/// Reads a config file of at most `MAX_CONFIG_BYTES`.
fn read_limited(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB; is this the right file?",
            MAX_CONFIG_BYTES >> 20
        )));
    }
    Ok(text)
}

/// " (line N: <that line>)", so TOML-level errors show the key they are about.
fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let number = text[..start].matches('\n').count() + 1;
    format!(" (line {number}: {})", text[line_start..line_end].trim())
}

/// The variables of `env` the config reads (`TAILGATE_*`, the reference's `TS_DEST_IP` and
/// `TS_TAILNET_TARGET_IP`), and only those: an environment holds secrets too.
pub fn overrides(env: &HashMap<String, String>) -> std::collections::BTreeMap<String, String> {
    env.iter()
        .filter(|(name, _)| {
            name.starts_with("TAILGATE_") || ["TS_DEST_IP", "TS_TAILNET_TARGET_IP"].contains(&name.as_str())
        })
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// Applies the `TAILGATE_*` variables. A variable set to an empty or blank value counts as
/// unset (container templates often render "not given" that way): it never clears a list
/// or setting of the file.
fn apply_env(raw: &mut RawConfig, env: &HashMap<String, String>) -> Result<(), ConfigError> {
    let get = |name: &str| env.get(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    if let Some(v) = get("TAILGATE_TUNNEL") {
        raw.tunnel = Some(v);
    }
    if let Some(v) = get("TAILGATE_INTERFACES") {
        raw.interfaces = Some(split_list(&v));
        raw.sources.interfaces = "TAILGATE_INTERFACES";
    }
    if let Some(v) = get("TAILGATE_BACKEND") {
        raw.backend = Some(parse_enum("TAILGATE_BACKEND", &v, "auto, bpf, iptables")?);
    }
    if let Some(v) = get("TAILGATE_KEEP_DATAPATH") {
        raw.keep_datapath = Some(parse_bool("TAILGATE_KEEP_DATAPATH", &v)?);
    }
    if let Some(v) = get("TAILGATE_METRICS_LISTEN") {
        raw.metrics_listen = Some(v);
        raw.metrics_source = Some("TAILGATE_METRICS_LISTEN");
    }
    if let Some(v) = get("TAILGATE_IPTABLES_DIVERT") {
        raw.iptables.divert = Some(parse_bool("TAILGATE_IPTABLES_DIVERT", &v)?);
    }
    if let Some(v) = get("TAILGATE_IPTABLES_VARIANT") {
        raw.iptables.variant = Some(parse_enum("TAILGATE_IPTABLES_VARIANT", &v, "auto, nft, legacy")?);
    }
    if let Some(v) = get("TAILGATE_IPTABLES_REPAIR_INTERVAL_MS") {
        let ms = u64::from_str(&v)
            .map_err(|_| ConfigError::new("TAILGATE_IPTABLES_REPAIR_INTERVAL_MS", "expected milliseconds"))?;
        raw.iptables.repair_interval_ms = Some(ms);
    }
    if let Some(v) = get("TAILGATE_IPTABLES_HOOK_POSITION") {
        raw.iptables.hook_position = Some(parse_enum("TAILGATE_IPTABLES_HOOK_POSITION", &v, "keep, first")?);
    }
    if let Some(v) = get("TAILGATE_SUBNET_ROUTES_MARK") {
        raw.subnet_routes.mark = Some(v);
        raw.sources.mark = "TAILGATE_SUBNET_ROUTES_MARK";
    }
    if let Some(v) = get("TAILGATE_SUBNET_ROUTES_MASQUERADE") {
        raw.subnet_routes.masquerade = Some(parse_bool("TAILGATE_SUBNET_ROUTES_MASQUERADE", &v)?);
    }
    if let Some(v) = get("TAILGATE_SUBNET_ROUTES_STATEFUL") {
        raw.subnet_routes.stateful = Some(parse_bool("TAILGATE_SUBNET_ROUTES_STATEFUL", &v)?);
    }
    if let Some(v) = get("TAILGATE_CGNAT_ALLOW_REPLIES") {
        raw.cgnat.allow_replies = Some(parse_bool("TAILGATE_CGNAT_ALLOW_REPLIES", &v)?);
    }
    for (var, slot) in [
        ("TAILGATE_FLOWS_MAX_ENTRIES_V4", &mut raw.flows.max_entries_v4),
        ("TAILGATE_FLOWS_MAX_ENTRIES_V6", &mut raw.flows.max_entries_v6),
    ] {
        if let Some(v) = get(var) {
            *slot =
                Some(i64::from_str(&v).map_err(|_| ConfigError::new(var, "expected a number of entries"))?);
        }
    }
    if let Some(v) = get("TAILGATE_MSS_CLAMP") {
        raw.mss.clamp = Some(match v.parse::<i64>() {
            Ok(n) => RawClamp::Number(n),
            Err(_) => RawClamp::Word(v),
        });
        raw.sources.clamp = "TAILGATE_MSS_CLAMP";
    }
    if let Some(v) = get("TAILGATE_CGNAT_MODE") {
        raw.cgnat.mode = Some(parse_enum("TAILGATE_CGNAT_MODE", &v, "drop, off")?);
    }
    if let Some(v) = get("TAILGATE_CGNAT_ALLOW") {
        raw.cgnat.allow = Some(split_list(&v));
        raw.sources.allow = "TAILGATE_CGNAT_ALLOW";
    }
    raw.proxy.apply_env(get);
    raw.nat.apply_env(get);
    if let Some(v) = get("TAILGATE_CGNAT_DROP") {
        raw.cgnat.drop = Some(split_list(&v));
        raw.sources.drop = "TAILGATE_CGNAT_DROP";
    }
    Ok(())
}

fn parse_bool(var: &str, v: &str) -> Result<bool, ConfigError> {
    bool::from_str(v).map_err(|_| ConfigError::new(var, "expected true or false"))
}

fn split_list(v: &str) -> Vec<String> {
    v.split([',', ' ']).map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

fn parse_enum<T: for<'de> Deserialize<'de>>(
    var: &str,
    value: &str,
    expected: &str,
) -> Result<T, ConfigError> {
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(value))
        .map_err(|_| ConfigError::new(var, format!("{value:?} is not one of: {expected}")))
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let tunnel = self.tunnel.unwrap_or_else(|| "tailscale0".to_string());
        check_ifname("tunnel", &tunnel)?;
        let sources = self.sources;
        if let Some(interfaces) = &self.interfaces {
            validate_interfaces(interfaces, &tunnel, sources.interfaces)?;
        }
        let allow = parse_prefixes(sources.allow, self.cgnat.allow.unwrap_or_default())?;
        let drop = parse_prefixes(sources.drop, self.cgnat.drop.unwrap_or_default())?;
        if let Some((i, j)) = first_common(&allow, &drop) {
            return Err(ConfigError::new(
                format!("{}[{j}]", sources.drop),
                format!("{} is also listed in {}[{i}]", drop[j], sources.allow),
            ));
        }
        if allow.len() + drop.len() > MAX_USER_PREFIXES {
            return Err(ConfigError::new(
                "cgnat",
                format!(
                    "{} prefixes in allow + drop; at most {MAX_USER_PREFIXES} are supported",
                    allow.len() + drop.len()
                ),
            ));
        }
        let repair_ms = self.iptables.repair_interval_ms.unwrap_or(DEFAULT_REPAIR_INTERVAL_MS);
        if !REPAIR_INTERVAL_MS.contains(&repair_ms) {
            return Err(ConfigError::new(
                "iptables.repair_interval_ms",
                format!(
                    "{repair_ms} is out of range {}..={}",
                    REPAIR_INTERVAL_MS.start(),
                    REPAIR_INTERVAL_MS.end()
                ),
            ));
        }
        let mark = match &self.subnet_routes.mark {
            Some(text) => parse_mark(sources.mark, text)?,
            None => Mark { value: tailgate_abi::mark::SUBNET_ROUTE, mask: tailgate_abi::mark::MASK },
        };
        let clamp = match self.mss.clamp {
            None => MssClamp::Pmtu,
            Some(raw) => parse_clamp(sources.clamp, raw)?,
        };
        let defaults = FlowsConfig::default();
        let flows = FlowsConfig {
            max_entries_v4: flow_entries(
                "flows.max_entries_v4",
                self.flows.max_entries_v4,
                defaults.max_entries_v4,
            )?,
            max_entries_v6: flow_entries(
                "flows.max_entries_v6",
                self.flows.max_entries_v6,
                defaults.max_entries_v6,
            )?,
        };
        let metrics_listen =
            metrics_listen(self.metrics_listen, self.metrics_source.unwrap_or("metrics_listen"))?;
        let services = services::validate(self.service)?;
        let proxy = self.proxy.validate()?;
        let nat = self.nat.validate()?;
        if let Some(to) = proxy.ingress_to {
            // The ingress proxy takes everything for the gateway's tailnet address.
            if let Some(own) = proxy.tailnet_address_like(to) {
                if let Some(i) = services.iter().position(|s| s.listen.ip() == own) {
                    return Err(ConfigError::new(
                        format!("service[{i}].listen"),
                        format!(
                            "{own} is the gateway's tailnet address, which {} sends on",
                            proxy.ingress_source
                        ),
                    ));
                }
            }
        }
        if let Some(to) = proxy.egress_to {
            // The target is reached through the tunnel: a service there would take it over.
            if let Some(i) = services.iter().position(|s| s.listen.ip() == to) {
                return Err(ConfigError::new(
                    format!("service[{i}].listen"),
                    format!("{to} is the egress proxy's target ({})", proxy.egress_source),
                ));
            }
            // The reference's stateful rule drops what is forwarded into the tunnel unless the
            // tunnel opened it: every proxied connection.
            if self.subnet_routes.stateful == Some(true) {
                return Err(ConfigError::new(
                    proxy.egress_source,
                    "the egress proxy forwards connections into the tunnel, which \
                     [subnet_routes] stateful = true drops; turn one of them off",
                ));
            }
        }
        Ok(Config {
            services,
            proxy,
            nat,
            subnet_routes: SubnetRoutesConfig {
                mark,
                masquerade: self.subnet_routes.masquerade.unwrap_or(true),
                stateful: self.subnet_routes.stateful.unwrap_or(false),
            },
            mss: MssConfig { clamp },
            flows,
            iptables: IptablesConfig {
                divert: self.iptables.divert.unwrap_or(true),
                variant: self.iptables.variant.unwrap_or(IptablesVariant::Auto),
                repair_interval: Duration::from_millis(repair_ms),
                hook_position: self.iptables.hook_position.unwrap_or(HookPosition::Keep),
            },
            sources,
            tunnel,
            interfaces: self.interfaces,
            backend: self.backend.unwrap_or(BackendKind::Auto),
            keep_datapath: self.keep_datapath.unwrap_or(false),
            metrics_listen,
            cgnat: CgnatConfig {
                mode: self.cgnat.mode.unwrap_or(CgnatMode::Drop),
                allow,
                drop,
                allow_replies: self.cgnat.allow_replies.unwrap_or(true),
            },
        })
    }
}

/// A flow table capacity within `MIN_ENTRIES..=MAX_ENTRIES`.
fn flow_entries(field: &str, value: Option<i64>, default: u32) -> Result<u32, ConfigError> {
    use tailgate_abi::conntrack::{MAX_ENTRIES, MIN_ENTRIES};
    let Some(value) = value else { return Ok(default) };
    match u32::try_from(value) {
        Ok(n) if (MIN_ENTRIES..=MAX_ENTRIES).contains(&n) => Ok(n),
        _ => Err(ConfigError::new(
            field,
            format!(
                "{value} is out of range {MIN_ENTRIES}..={MAX_ENTRIES} (an LRU table smaller than \
                 {MIN_ENTRIES} evicts before it is full)"
            ),
        )),
    }
}

/// `"0x40000/0xff0000"` (hex or decimal, each part).
fn parse_mark(field: &str, text: &str) -> Result<Mark, ConfigError> {
    let number = |s: &str| {
        let s = s.trim();
        match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => s.parse::<u32>(),
        }
    };
    let bad = || {
        ConfigError::new(
            field,
            format!("{text:?} is not a mark: expected value/mask, e.g. \"0x40000/0xff0000\""),
        )
    };
    let (value, mask) = text.split_once('/').ok_or_else(bad)?;
    let (value, mask) = (number(value).map_err(|_| bad())?, number(mask).map_err(|_| bad())?);
    if mask == 0 {
        return Err(ConfigError::new(field, "the mask is 0: the mark would own no bits"));
    }
    if value & !mask != 0 {
        return Err(ConfigError::new(
            field,
            format!("value {value:#x} has bits outside mask {mask:#x} (did you mean {:#x}?)", value & mask),
        ));
    }
    if value == 0 {
        return Err(ConfigError::new(
            field,
            "the value is 0: every unmarked packet would look marked (and be masqueraded)",
        ));
    }
    Ok(Mark { value, mask })
}

fn parse_clamp(field: &str, raw: RawClamp) -> Result<MssClamp, ConfigError> {
    match raw {
        RawClamp::Word(w) if w == "pmtu" => Ok(MssClamp::Pmtu),
        RawClamp::Word(w) if w == "off" => Ok(MssClamp::Off),
        RawClamp::Word(w) => match w.trim().parse::<i64>() {
            Ok(n) => parse_clamp(field, RawClamp::Number(n)),
            Err(_) => {
                Err(ConfigError::new(field, format!("{w:?} is not \"pmtu\", \"off\" or an MSS in bytes")))
            }
        },
        RawClamp::Number(n) => match u16::try_from(n) {
            Ok(mss) if MSS_RANGE.contains(&mss) => Ok(MssClamp::Fixed(mss)),
            _ => Err(ConfigError::new(
                field,
                format!(
                    "{n} is not an MSS a TCP stack can use ({}..={}; 536 is the least every IPv4 host must accept)",
                    MSS_RANGE.start(),
                    MSS_RANGE.end()
                ),
            )),
        },
    }
}

fn check_ifname(field: &str, name: &str) -> Result<(), ConfigError> {
    let bad = name.is_empty()
        || name.len() > IFNAME_MAX
        || name == "."
        || name == ".."
        || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
    if bad {
        return Err(ConfigError::new(
            field,
            format!(
                "{name:?} is not a valid interface name (1-{IFNAME_MAX} characters, no '/', ':' or spaces)"
            ),
        ));
    }
    Ok(())
}

fn validate_interfaces(interfaces: &[String], tunnel: &str, source: &str) -> Result<(), ConfigError> {
    if interfaces.is_empty() {
        return Err(ConfigError::new(
            source,
            "an empty list would leave every uplink unprotected; omit it to use every up Ethernet \
             interface but the tunnel, or set cgnat.mode = \"off\" to disable filtering",
        ));
    }
    for (i, name) in interfaces.iter().enumerate() {
        let field = format!("{source}[{i}]");
        check_ifname(&field, name)?;
        if name == tunnel {
            return Err(ConfigError::new(
                field,
                format!("{name:?} is the tunnel; the tunnel cannot also be an uplink"),
            ));
        }
        if name == "lo" {
            return Err(ConfigError::new(
                field,
                "\"lo\" cannot be an uplink: loopback carries this host's own tailnet traffic",
            ));
        }
        if let Some(j) = interfaces[..i].iter().position(|n| n == name) {
            return Err(ConfigError::new(field, format!("{name:?} is already listed as {source}[{j}]")));
        }
    }
    Ok(())
}

fn parse_prefixes(field: &str, items: Vec<String>) -> Result<Vec<IpNet>, ConfigError> {
    // The field's name is only formatted for an error: lists have 100,000s of items.
    items
        .iter()
        .enumerate()
        .map(|(i, s)| parse_prefix(s).map_err(|e| ConfigError::new(format!("{field}[{i}]"), e)))
        .collect()
}

/// One filtered-range prefix: a CIDR (or a bare address, taken as /32 or /128) inside
/// 100.64.0.0/10 or fd7a:115c:a1e0::/48, without host bits.
fn parse_prefix(s: &str) -> Result<IpNet, String> {
    if has_leading_zero_octet(s) {
        return Err(format!(
            "{s:?} has an octet with a leading zero, which other tools read as octal; write it without"
        ));
    }
    let net = match IpNet::from_str(s).or_else(|_| IpAddr::from_str(s).map(IpNet::from)) {
        Ok(net) => net,
        Err(_) => return Err(format!("{s:?} is not a valid prefix (expected e.g. 100.100.0.0/16)")),
    };
    if net.trunc() != net {
        return Err(format!("{s} has host bits set (did you mean {}?)", net.trunc()));
    }
    let range = match net {
        IpNet::V4(_) => IpNet::V4(CGNAT_V4),
        IpNet::V6(_) => IpNet::V6(TAILNET_ULA_V6),
    };
    if !range.contains(&net) {
        return Err(format!(
            "{net} is outside the filtered range {range} of its family; only prefixes inside it can be allowed or dropped"
        ));
    }
    Ok(net)
}

/// Whether an IPv4 address (or prefix) has an octet like `010`.
fn has_leading_zero_octet(s: &str) -> bool {
    let addr = s.split('/').next().unwrap_or(s);
    !addr.contains(':') && addr.split('.').any(|octet| octet.len() > 1 && octet.starts_with('0'))
}

fn first_common(a: &[IpNet], b: &[IpNet]) -> Option<(usize, usize)> {
    let index: HashMap<&IpNet, usize> = a.iter().enumerate().map(|(i, p)| (p, i)).collect();
    b.iter().enumerate().find_map(|(j, p)| index.get(p).map(|&i| (i, j)))
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Auto => "auto",
            BackendKind::Bpf => "bpf",
            BackendKind::Iptables => "iptables",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, &HashMap::new())
    }

    fn err_field(text: &str) -> String {
        parse(text).unwrap_err().field
    }

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// The sample config in deploy/ is valid, and so are its commented-out examples.
    #[test]
    fn the_sample_config_and_its_examples_are_valid() {
        let sample = include_str!("../../../deploy/tailgate.toml");
        parse(sample).unwrap();
        let examples: String = sample
            .lines()
            .map(|l| l.strip_prefix("# ").filter(|r| r.starts_with('[') || r.contains(" = ")).unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let config = parse(&examples).unwrap();
        assert_eq!(config.services.len(), 1);
        assert!(config.proxy.ingress_to.is_some());
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.tunnel, "tailscale0");
        assert_eq!(c.interfaces, None);
        assert_eq!(c.backend, BackendKind::Auto);
        assert!(!c.keep_datapath);
        assert_eq!(c.cgnat.mode, CgnatMode::Drop);
        assert!(c.cgnat.allow.is_empty() && c.cgnat.drop.is_empty());
        assert!(c.iptables.divert);
        assert_eq!(c.iptables.variant, IptablesVariant::Auto);
        assert_eq!(c.iptables.repair_interval, Duration::from_millis(500));
    }

    #[test]
    fn iptables_settings() {
        let c = parse("[iptables]\ndivert = false\nvariant = \"legacy\"\nrepair_interval_ms = 200").unwrap();
        assert!(!c.iptables.divert);
        assert_eq!(c.iptables.variant, IptablesVariant::Legacy);
        assert_eq!(c.iptables.repair_interval, Duration::from_millis(200));
        assert_eq!(err_field("[iptables]\nrepair_interval_ms = 5"), "iptables.repair_interval_ms");
        assert!(parse("[iptables]\nvariant = \"xtables\"").is_err());
        let env = vars(&[("TAILGATE_IPTABLES_DIVERT", "false")]);
        assert!(!Config::parse("", &env).unwrap().iptables.divert);
    }

    #[test]
    fn full_example() {
        let c = parse(
            r#"
            tunnel = "tailscale0"
            interfaces = ["eth0", "eth1"]
            backend = "bpf"
            [cgnat]
            mode = "drop"
            allow = ["100.100.0.0/16", "fd7a:115c:a1e0:ab::/64"]
            drop  = ["100.100.100.200"]
            "#,
        )
        .unwrap();
        assert_eq!(c.interfaces.unwrap(), ["eth0", "eth1"]);
        assert_eq!(c.backend, BackendKind::Bpf);
        assert_eq!(c.cgnat.allow[1].to_string(), "fd7a:115c:a1e0:ab::/64");
        assert_eq!(c.cgnat.drop[0].to_string(), "100.100.100.200/32");
    }

    #[test]
    fn bad_cidr_names_the_entry() {
        let e = parse("[cgnat]\nallow = [\"100.100.0.0/16\", \"100.100.0.0/33\"]").unwrap_err();
        assert_eq!(e.field, "cgnat.allow[1]");
        assert!(e.message.contains("not a valid prefix"), "{e}");
    }

    #[test]
    fn host_bits_are_refused_with_a_hint() {
        let e = parse("[cgnat]\ndrop = [\"100.100.1.0/16\"]").unwrap_err();
        assert_eq!(e.field, "cgnat.drop[0]");
        assert!(e.message.contains("did you mean 100.100.0.0/16"), "{e}");
    }

    #[test]
    fn prefix_of_the_wrong_range_is_refused() {
        // An IPv4 prefix outside CGNAT, and an IPv6 prefix outside the tailnet ULA.
        assert_eq!(err_field("[cgnat]\nallow = [\"10.0.0.0/8\"]"), "cgnat.allow[0]");
        let e = parse("[cgnat]\ndrop = [\"2001:db8::/32\"]").unwrap_err();
        assert_eq!(e.field, "cgnat.drop[0]");
        assert!(e.message.contains("fd7a:115c:a1e0::/48"), "{e}");
        // A v4 prefix covering more than CGNAT is outside it too.
        assert_eq!(err_field("[cgnat]\nallow = [\"100.0.0.0/8\"]"), "cgnat.allow[0]");
    }

    #[test]
    fn same_prefix_in_allow_and_drop_is_refused() {
        let e = parse("[cgnat]\nallow = [\"100.100.0.0/16\"]\ndrop = [\"100.100.0.0/16\"]").unwrap_err();
        assert_eq!(e.field, "cgnat.drop[0]");
        assert!(e.message.contains("cgnat.allow[0]"), "{e}");
    }

    #[test]
    fn tunnel_as_uplink_is_refused() {
        let e = parse("tunnel = \"tun9\"\ninterfaces = [\"eth0\", \"tun9\"]").unwrap_err();
        assert_eq!(e.field, "interfaces[1]");
        assert!(e.message.contains("tunnel"), "{e}");
    }

    #[test]
    fn loopback_and_duplicate_uplinks_are_refused() {
        assert_eq!(err_field("interfaces = [\"lo\"]"), "interfaces[0]");
        assert_eq!(err_field("interfaces = [\"eth0\", \"eth0\"]"), "interfaces[1]");
        assert_eq!(err_field("interfaces = [\"a/b\"]"), "interfaces[0]");
        assert_eq!(err_field("tunnel = \"\""), "tunnel");
        assert_eq!(err_field("tunnel = \"averyveryverylongname\""), "tunnel");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = parse("tunel = \"x\"").unwrap_err();
        assert!(e.message.contains("unknown field `tunel`"), "{e}");
        assert!(e.message.contains("line 1: tunel = \"x\""), "{e}");
        let e = parse("[cgnat]\nexempt = []").unwrap_err();
        assert!(e.message.contains("unknown field `exempt`"), "{e}");
    }

    #[test]
    fn bad_enum_values_are_refused_naming_the_key() {
        let e = parse("backend = \"ebpf\"").unwrap_err();
        assert!(e.message.contains("backend = \"ebpf\""), "{e}");
        let e = parse("[cgnat]\nmode = \"on\"").unwrap_err();
        assert!(e.message.contains("line 2: mode = \"on\""), "{e}");
    }

    #[test]
    fn env_overrides_the_file() {
        let env: HashMap<String, String> = [
            ("TAILGATE_TUNNEL", "wg0"),
            ("TAILGATE_INTERFACES", "eth0, eth1"),
            ("TAILGATE_CGNAT_ALLOW", "100.100.0.0/16,100.64.0.0/24"),
            ("TAILGATE_CGNAT_MODE", "off"),
            ("TAILGATE_KEEP_DATAPATH", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = Config::parse("tunnel = \"tailscale0\"", &env).unwrap();
        assert_eq!(c.tunnel, "wg0");
        assert_eq!(c.interfaces.unwrap(), ["eth0", "eth1"]);
        assert_eq!(c.cgnat.allow.len(), 2);
        assert_eq!(c.cgnat.mode, CgnatMode::Off);
        assert!(c.keep_datapath);
    }

    #[test]
    fn env_errors_name_the_variable() {
        let env = vars(&[("TAILGATE_BACKEND", "nft")]);
        assert_eq!(Config::parse("", &env).unwrap_err().field, "TAILGATE_BACKEND");
        let env = vars(&[("TAILGATE_CGNAT_DROP", "100.64.0.0/24, 1.2.3.4/32")]);
        assert_eq!(Config::parse("", &env).unwrap_err().field, "TAILGATE_CGNAT_DROP[1]");
        let env = vars(&[("TAILGATE_INTERFACES", "eth0 lo")]);
        assert_eq!(Config::parse("", &env).unwrap_err().field, "TAILGATE_INTERFACES[1]");
        // Rule origins name the variable too.
        let env = vars(&[("TAILGATE_CGNAT_ALLOW", "100.100.0.0/16")]);
        let c = Config::parse("", &env).unwrap();
        assert_eq!(c.user_prefixes().next().unwrap().0.to_string(), "TAILGATE_CGNAT_ALLOW[0]");
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let file = "interfaces = [\"eth0\"]\n[cgnat]\nallow = [\"100.100.0.0/16\"]";
        for value in ["", "  "] {
            let env: HashMap<String, String> =
                ["TAILGATE_INTERFACES", "TAILGATE_CGNAT_ALLOW", "TAILGATE_BACKEND"]
                    .into_iter()
                    .map(|k| (k.to_string(), value.to_string()))
                    .collect();
            let c = Config::parse(file, &env).unwrap();
            assert_eq!(c.interfaces.as_deref(), Some(&["eth0".to_string()][..]));
            assert_eq!(c.cgnat.allow.len(), 1, "an empty variable must not clear the file's list");
            assert_eq!(c.backend, BackendKind::Auto);
            assert_eq!(c.sources, ListSources::default());
        }
        // A value with only separators is a list with nothing in it: refused for interfaces.
        let env = vars(&[("TAILGATE_INTERFACES", ",")]);
        assert_eq!(Config::parse("", &env).unwrap_err().field, "TAILGATE_INTERFACES");
    }

    #[test]
    fn an_explicit_empty_uplink_list_is_refused() {
        let e = parse("interfaces = []").unwrap_err();
        assert_eq!(e.field, "interfaces");
        assert!(e.message.contains("unprotected"), "{e}");
    }

    #[test]
    fn octets_with_leading_zeros_are_refused() {
        let e = parse("[cgnat]\nallow = [\"100.100.010.0/24\"]").unwrap_err();
        assert_eq!(e.field, "cgnat.allow[0]");
        assert!(e.message.contains("leading zero"), "{e}");
        assert_eq!(err_field("[cgnat]\ndrop = [\"100.064.0.0/16\"]"), "cgnat.drop[0]");
        assert_eq!(err_field("[cgnat]\ndrop = [\"100.100.0.05\"]"), "cgnat.drop[0]");
        // Zero itself, and IPv6 groups with leading zeros, are fine.
        assert!(parse("[cgnat]\nallow = [\"100.100.0.0/16\", \"fd7a:115c:a1e0:00ab::/64\"]").is_ok());
    }

    #[test]
    fn oversized_config_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.toml");
        let line = "# padding padding padding padding padding padding padding padding\n";
        let text = line.repeat((MAX_CONFIG_BYTES as usize / line.len()) + 1);
        std::fs::write(&path, text).unwrap();
        let e = Config::load(Some(&path)).unwrap_err();
        assert!(e.message.contains("larger than 16 MiB"), "{e}");
    }

    #[test]
    fn flow_settings() {
        let c = parse("").unwrap();
        assert!(c.cgnat.allow_replies && !c.subnet_routes.stateful);
        assert_eq!(c.flows, FlowsConfig::default());
        let c = parse(
            "[cgnat]\nallow_replies = false\n[subnet_routes]\nstateful = true\n[flows]\nmax_entries_v4 = 2048",
        )
        .unwrap();
        assert!(!c.cgnat.allow_replies && c.subnet_routes.stateful);
        assert_eq!(c.flows.max_entries_v4, 2048);
        for bad in ["0", "-1", "1023", "16777217", "4294967296"] {
            let e = parse(&format!("[flows]\nmax_entries_v6 = {bad}")).unwrap_err();
            assert_eq!(e.field, "flows.max_entries_v6", "{bad}");
            assert!(e.message.contains("out of range 1024..=16777216"), "{e}");
        }
        let env = vars(&[
            ("TAILGATE_CGNAT_ALLOW_REPLIES", "false"),
            ("TAILGATE_SUBNET_ROUTES_STATEFUL", "true"),
            ("TAILGATE_FLOWS_MAX_ENTRIES_V4", "4096"),
        ]);
        let c = Config::parse("", &env).unwrap();
        assert!(!c.cgnat.allow_replies && c.subnet_routes.stateful);
        assert_eq!(c.flows.max_entries_v4, 4096);
        let env = vars(&[("TAILGATE_FLOWS_MAX_ENTRIES_V6", "lots")]);
        assert_eq!(Config::parse("", &env).unwrap_err().field, "TAILGATE_FLOWS_MAX_ENTRIES_V6");
        assert_eq!(parse("[flows]\nsize = 1").unwrap_err().field, "config");
    }

    #[test]
    fn hook_position() {
        assert_eq!(parse("").unwrap().iptables.hook_position, HookPosition::Keep);
        let c = parse("[iptables]\nhook_position = \"first\"").unwrap();
        assert_eq!(c.iptables.hook_position, HookPosition::First);
        assert!(parse("[iptables]\nhook_position = \"top\"").is_err());
    }

    #[test]
    fn subnet_routes_settings() {
        let c = parse("").unwrap();
        assert_eq!(
            c.subnet_routes,
            SubnetRoutesConfig {
                mark: Mark { value: 0x40000, mask: 0xff0000 },
                masquerade: true,
                stateful: false
            }
        );
        let c = parse("[subnet_routes]\nmark = \"0x1/0xf\"\nmasquerade = false").unwrap();
        assert_eq!(
            c.subnet_routes,
            SubnetRoutesConfig { mark: Mark { value: 1, mask: 0xf }, masquerade: false, stateful: false }
        );
        assert_eq!(
            parse("[subnet_routes]\nmark = \"4096/61440\"").unwrap().subnet_routes.mark.to_string(),
            "0x1000/0xf000"
        );
        for bad in ["0x40000", "0x40000/0xf000", "0x0/0xff0000", "0x1/0", "x/0xff", "0x1/0x1ffffffff"] {
            let e = parse(&format!("[subnet_routes]\nmark = \"{bad}\"")).unwrap_err();
            assert_eq!(e.field, "subnet_routes.mark", "{bad}");
        }
        let e = parse("[subnet_routes]\nmark = \"0x40000/0xf000\"").unwrap_err();
        assert!(e.message.contains("outside mask"), "{e}");
        let env = vars(&[
            ("TAILGATE_SUBNET_ROUTES_MARK", "0x2/0x2"),
            ("TAILGATE_SUBNET_ROUTES_MASQUERADE", "false"),
        ]);
        let c = Config::parse("", &env).unwrap();
        assert_eq!((c.subnet_routes.mark.value, c.subnet_routes.masquerade), (2, false));
        let env = vars(&[("TAILGATE_SUBNET_ROUTES_MARK", "7/2")]);
        assert_eq!(Config::parse("", &env).unwrap_err().field, "TAILGATE_SUBNET_ROUTES_MARK");
    }

    #[test]
    fn mss_settings() {
        assert_eq!(parse("").unwrap().mss.clamp, MssClamp::Pmtu);
        assert_eq!(parse("[mss]\nclamp = \"off\"").unwrap().mss.clamp, MssClamp::Off);
        assert_eq!(parse("[mss]\nclamp = 1200").unwrap().mss.clamp, MssClamp::Fixed(1200));
        assert_eq!(parse("[mss]\nclamp = \"1200\"").unwrap().mss.clamp, MssClamp::Fixed(1200));
        for bad in ["0", "535", "65496", "-1", "\"auto\"", "\"100\""] {
            assert_eq!(err_field(&format!("[mss]\nclamp = {bad}")), "mss.clamp", "{bad}");
        }
        let env = vars(&[("TAILGATE_MSS_CLAMP", "1300")]);
        assert_eq!(Config::parse("", &env).unwrap().mss.clamp, MssClamp::Fixed(1300));
        let env = vars(&[("TAILGATE_MSS_CLAMP", "12")]);
        assert_eq!(Config::parse("", &env).unwrap_err().field, "TAILGATE_MSS_CLAMP");
    }
}
