//! Starting over pins of another layout (an upgrade or downgrade with `keep_datapath`): the
//! maps this version cannot reuse are rebuilt from the configuration, the kept links switch
//! to the new programs, and nothing counts into wrong slots.

use std::path::Path;

use aya::maps::{Array, MapData, MapInfo, PerCpuArray, PerCpuValues};
use tailgate_abi::{counters::Counter, layout, settings, MAP_COUNTERS};
use tailgate_tests::{
    daemon::{attachments, status, Daemon},
    topology::{Topology, BPF_ATTACHMENTS},
};

const CONFIG: &str = "tunnel = \"tun0\"\ninterfaces = [\"eth0\"]\nbackend = \"bpf\"\nkeep_datapath = true\n";

fn map(t: &Topology, name: &str) -> std::path::PathBuf {
    t.pins.path().join("maps").join(name)
}

/// Stops a kept daemon, then makes its pins look like an older layout's: `COUNTERS` with the
/// ten counters of layout 1 (each holding `marker`), no `SETTINGS`, and the given
/// `LAYOUT` (none: layout 1 had no such map).
fn kept_pins_of_older_layout(t: &Topology, layout_version: Option<u32>, marker: u64) {
    let mut daemon = Daemon::start(&t.gw, &t.pins, CONFIG).unwrap();
    assert_eq!(daemon.stop(), Some(0));
    for name in [MAP_COUNTERS, settings::MAP, layout::MAP] {
        std::fs::remove_file(map(t, name)).unwrap();
    }
    let cpus = aya::util::nr_cpus().unwrap();
    let mut old = PerCpuArray::<MapData, u64>::create(10, 0).unwrap();
    for slot in 0..10 {
        old.set(slot, PerCpuValues::try_from(vec![marker; cpus]).unwrap(), 0).unwrap();
    }
    old.pin(map(t, MAP_COUNTERS)).unwrap();
    if let Some(version) = layout_version {
        let mut meta = Array::<MapData, u32>::create(1, 0).unwrap();
        meta.set(0, version, 0).unwrap();
        meta.pin(map(t, layout::MAP)).unwrap();
    }
}

fn entries(path: &Path) -> u32 {
    MapInfo::from_pin(path).unwrap().max_entries()
}

fn comes_up_right(t: &Topology, marker: u64) {
    let mut daemon = Daemon::start(&t.gw, &t.pins, CONFIG).unwrap();
    daemon.wait_for_log("rebuilt from the configuration");
    assert_eq!(entries(&map(t, MAP_COUNTERS)), Counter::COUNT, "counters rebuilt in this layout's shape");
    let meta = aya::maps::Map::from_map_data(MapData::from_pin(map(t, layout::MAP)).unwrap()).unwrap();
    let meta: Array<&MapData, u32> = Array::try_from(&meta).unwrap();
    assert_eq!(meta.get(&0, 0).unwrap(), layout::VERSION);
    assert!(map(t, settings::MAP).exists());
    // The policy is in force through the new programs, counted in the new slots.
    assert!(!t.cgnat_neighbours_ping(), "CGNAT neighbour not dropped after the upgrade");
    let s = status(&t.gw, &t.pins);
    let drops = s["counters"]["uplink_drop"].as_u64().unwrap();
    assert!(drops >= 1 && drops < marker, "uplink_drop {drops}: counted anew, not on top of the old map");
    assert_eq!(attachments(&s), BPF_ATTACHMENTS);
    let leftovers: Vec<_> = std::fs::read_dir(t.pins.path().join("maps"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("@stale"))
        .collect();
    assert!(leftovers.is_empty(), "set-aside maps left: {leftovers:?}");
    daemon.write_config(&CONFIG.replace("keep_datapath = true", "keep_datapath = false")).unwrap();
    daemon.reload().unwrap();
    assert_eq!(daemon.stop(), Some(0));
    assert!(!t.pins.path().exists(), "everything removed, set-aside maps included");
}

#[test]
fn pins_of_layout_one_are_upgraded_map_by_map() {
    let t = Topology::new().unwrap();
    kept_pins_of_older_layout(&t, None, 1_000_000);
    comes_up_right(&t, 1_000_000);
}

#[test]
fn pins_of_an_unknown_layout_are_rebuilt_whole() {
    let t = Topology::new().unwrap();
    kept_pins_of_older_layout(&t, Some(99), 1_000_000);
    comes_up_right(&t, 1_000_000);
}

/// Layout 2 kept the prefixes in LPM tries and layout 3 in hash maps, under the names layout
/// 4 uses for arrays of slot tables: the map type tells them apart, and the start rebuilds
/// them instead of reading one as the other.
#[test]
fn prefix_maps_of_layouts_two_and_three_are_rebuilt_as_slot_tables() {
    use aya::maps::{lpm_trie::Key, HashMap as BpfHashMap, LpmTrie, MapType};
    use tailgate_abi::cgnat::{PrefixRule, MAP_IN_V4};

    // Both generations of the largest policy, as those layouts sized them.
    let capacity = 2 * tailgate_abi::MAX_RULES;
    // An exemption for all of CGNAT that this version must not read as its own: generation
    // tag (and, for the hash map, the length), then the address.
    let everything = PrefixRule { verdict: tailgate_abi::verdict::PASS, rule_id: 0 };
    for old_layout in [2, 3] {
        let t = Topology::new().unwrap();
        let mut daemon = Daemon::start(&t.gw, &t.pins, CONFIG).unwrap();
        assert_eq!(daemon.stop(), Some(0));
        let path = map(&t, MAP_IN_V4);
        std::fs::remove_file(&path).unwrap();
        if old_layout == 2 {
            let mut trie = LpmTrie::<MapData, [u8; 8], PrefixRule>::create(capacity, 1).unwrap();
            trie.insert(&Key::new(32 + 10, [0, 0, 0, 0, 100, 64, 0, 0]), everything, 0).unwrap();
            trie.pin(&path).unwrap();
        } else {
            let mut hash = BpfHashMap::<MapData, [u8; 8], PrefixRule>::create(capacity, 1).unwrap();
            for generation in 0..2 {
                hash.insert([generation, 10, 0, 0, 100, 64, 0, 0], everything, 0).unwrap();
            }
            hash.pin(&path).unwrap();
        }
        let mut meta = Array::<MapData, u32>::create(1, 0).unwrap();
        meta.set(0, old_layout, 0).unwrap();
        std::fs::remove_file(map(&t, layout::MAP)).unwrap();
        meta.pin(map(&t, layout::MAP)).unwrap();

        let mut daemon = Daemon::start(&t.gw, &t.pins, CONFIG).unwrap();
        daemon.wait_for_log("rebuilt from the configuration");
        assert_eq!(MapInfo::from_pin(&path).unwrap().map_type().unwrap(), MapType::ArrayOfMaps);
        assert!(
            !t.cgnat_neighbours_ping(),
            "layout {old_layout}: CGNAT neighbour not dropped after the upgrade"
        );
        assert_eq!(daemon.stop(), Some(0));
    }
}

#[test]
fn flow_tables_of_another_size_are_rebuilt_and_their_counters_start_over() {
    use tailgate_abi::conntrack::MAP_V4;
    use tailgate_tests::topology::{GW_LAN_CGNAT, LAN_CGNAT};
    let t = Topology::new().unwrap();
    let mut daemon = Daemon::start(&t.gw, &t.pins, CONFIG).unwrap();
    // Own flows towards the CGNAT LAN host (pings with different identifiers).
    for _ in 0..3 {
        t.gw.ping(LAN_CGNAT, Some(GW_LAN_CGNAT));
    }
    let s = status(&t.gw, &t.pins);
    assert!(s["counters"]["flow_created"].as_u64().unwrap() >= 3, "{s}");
    assert_eq!(daemon.stop(), Some(0));
    // Kept, then started with another table size: the table is rebuilt (its flows go), the
    // counters are kept — but not the flow counters, which describe the table.
    let resized = format!("{CONFIG}[flows]\nmax_entries_v4 = 2048\n");
    let _daemon = Daemon::start(&t.gw, &t.pins, &resized).unwrap();
    assert_eq!(entries(&map(&t, MAP_V4)), 2048);
    let s = status(&t.gw, &t.pins);
    assert_eq!(s["flows"]["capacity_v4"], 2048, "{s}");
    assert_eq!(s["flows"]["entries_v4"], 0, "{s}");
    assert_eq!(s["flows"]["evicted"], 0, "no evictions reported for flows the rebuild dropped: {s}");
    assert_eq!(s["counters"]["flow_created"], 0, "{s}");
}
