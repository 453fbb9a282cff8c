//! Handles on the pinned maps, opened by path so a second process (`kproxy
//! status`, a restarted kproxy) sees exactly what the kernel holds.

use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap, Map, MapData, MapError};
use proxy_common::maps as names;
use proxy_common::*;

use super::tables::{KernelHash, KernelRanges, Tables};
use crate::dataplane::DataplaneError;

pub fn maps_dir(pin: &Path) -> PathBuf {
    pin.join("maps")
}

pub fn links_dir(pin: &Path) -> PathBuf {
    pin.join("links")
}

pub(super) fn open(pin: &Path, name: &str) -> Result<Map, DataplaneError> {
    let path = maps_dir(pin).join(name);
    let data = MapData::from_pin(&path).map_err(|e| {
        DataplaneError::Other(format!(
            "cannot open pinned map {} (is kproxy running in ebpf mode with this --bpf-pin-path?): {e}",
            path.display()
        ))
    })?;
    Map::from_map_data(data).map_err(|e| map_err(name, e))
}

pub fn map_err(name: &str, e: MapError) -> DataplaneError {
    DataplaneError::Other(format!("map {name}: {e}"))
}

/// The maps userspace writes and reads.
pub struct Maps {
    pub frontends: HashMap<MapData, FrontendKey, Frontend>,
    pub slots: HashMap<MapData, SlotKey, u32>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub svc_info: HashMap<MapData, u32, SvcInfo>,
    pub src_ranges: LpmTrie<MapData, SrcRangeKey, u8>,
    pub cluster_cidrs: LpmTrie<MapData, u32, u8>,
    pub node_ips: HashMap<MapData, u32, u8>,
    pub if_addrs: HashMap<MapData, u32, u32>,
    pub config: Array<MapData, Config>,
}

macro_rules! typed {
    ($pin:expr, $name:expr) => {
        open($pin, $name)?
            .try_into()
            .map_err(|e| map_err($name, e))?
    };
}

/// The node-wide maps (addresses, CIDRs, settings), written at start and
/// on node changes.
pub struct NodeMaps {
    pub cluster_cidrs: LpmTrie<MapData, u32, u8>,
    pub node_ips: HashMap<MapData, u32, u8>,
    pub if_addrs: HashMap<MapData, u32, u32>,
    pub config: Array<MapData, Config>,
}

impl Maps {
    /// The writer's tables (batched where the kernel can) and the node maps.
    pub fn split(self) -> (Tables, NodeMaps) {
        (
            Tables {
                frontends: Box::new(KernelHash::new(names::FRONTENDS, self.frontends)),
                slots: Box::new(KernelHash::new(names::SLOTS, self.slots)),
                backends: Box::new(KernelHash::new(names::BACKENDS, self.backends)),
                svc_info: Box::new(KernelHash::new(names::SVC_INFO, self.svc_info)),
                src_ranges: Box::new(KernelRanges::new(self.src_ranges)),
            },
            NodeMaps {
                cluster_cidrs: self.cluster_cidrs,
                node_ips: self.node_ips,
                if_addrs: self.if_addrs,
                config: self.config,
            },
        )
    }

    pub fn open(pin: &Path) -> Result<Maps, DataplaneError> {
        Ok(Maps {
            frontends: typed!(pin, names::FRONTENDS),
            slots: typed!(pin, names::SLOTS),
            backends: typed!(pin, names::BACKENDS),
            svc_info: typed!(pin, names::SVC_INFO),
            src_ranges: typed!(pin, names::SRC_RANGES),
            cluster_cidrs: typed!(pin, names::CLUSTER_CIDRS),
            node_ips: typed!(pin, names::NODE_IPS),
            if_addrs: typed!(pin, names::IF_ADDRS),
            config: typed!(pin, names::CONFIG),
        })
    }

    /// `max_entries` of a pinned map, as the kernel has it.
    pub fn capacity(pin: &Path, name: &str) -> Result<u32, DataplaneError> {
        let data = MapData::from_pin(maps_dir(pin).join(name)).map_err(|e| map_err(name, e))?;
        Ok(data.info().map_err(|e| map_err(name, e))?.max_entries())
    }
}
