//! Loading the programs, attaching them, pinning maps and links, adopting
//! what a previous kproxy left pinned, and removing it all.
//!
//! Layout under the pin path: `maps/<MAP>` and `links/<hook>`. Maps found
//! pinned are reused as they are (their contents are the previous
//! instance's state: conntrack, NAT, affinity, services) when their layout
//! stamp is this build's (see `layout`). TC links are TCX
//! links: a pinned one gets the new program by an atomic link update, so
//! packets never see a moment without a program. cgroup links get the new
//! program attached next to the old one before the old link is released;
//! running both for a moment is harmless (the second sees a backend
//! address, which is no frontend).

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
};
use aya::sys::SyscallError;
use aya::{Ebpf, EbpfLoader};
use proxy_common::maps as names;
use tracing::{debug, info, warn};

use super::checks::Device;
use super::maps::{links_dir, maps_dir};
use super::MapSizes;
use crate::dataplane::DataplaneError;

/// The eBPF object built by build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

const CGROUP_PROGRAMS: &[&str] = &[
    "kproxy_connect4",
    "kproxy_sendmsg4",
    "kproxy_recvmsg4",
    "kproxy_getpeername4",
    // AF_INET6 sockets dialling v4-mapped Service addresses.
    "kproxy_connect6",
    "kproxy_recvmsg6",
    "kproxy_getpeername6",
];
const TC_INGRESS: &str = "kproxy_tc_ingress";
const TC_EGRESS: &str = "kproxy_tc_egress";

/// The eBPF object (for its map layouts).
pub fn object() -> &'static [u8] {
    PROGRAMS
}

fn other(msg: String) -> DataplaneError {
    DataplaneError::Other(msg)
}

fn prog_err(name: &str, what: &str, e: ProgramError) -> DataplaneError {
    match e {
        // The verifier's log, whole: it is what explains a rejection.
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => other(format!(
            "the kernel rejected eBPF program {name} ({io_error}); verifier log:\n{verifier_log}"
        )),
        e => other(format!("{what} eBPF program {name}: {e}")),
    }
}

fn not_found(e: &LinkError) -> bool {
    matches!(e, LinkError::SyscallError(SyscallError { io_error, .. }) if io_error.kind() == ErrorKind::NotFound)
}

/// Loads the object with every map pinned under `pin/maps` (reusing pins
/// that exist) and the given sizes for maps created now.
pub fn load(pin: &Path, sizes: &MapSizes) -> Result<Ebpf, DataplaneError> {
    let maps = maps_dir(pin);
    std::fs::create_dir_all(&maps)
        .map_err(|e| other(format!("creating {}: {e}", maps.display())))?;
    std::fs::create_dir_all(links_dir(pin))
        .map_err(|e| other(format!("creating {}: {e}", links_dir(pin).display())))?;
    let paths: Vec<(&str, PathBuf)> = names::ALL.iter().map(|n| (*n, maps.join(n))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    for (name, size) in sizes.by_map() {
        loader.map_max_entries(name, size);
    }
    let ebpf = loader
        .load(PROGRAMS)
        .map_err(|e| other(format!("loading kproxy's eBPF object: {e}")))?;
    for (name, size) in sizes.by_map() {
        if let Ok(have) = super::maps::Maps::capacity(pin, name) {
            if have != size {
                warn!(
                    map = name,
                    pinned = have,
                    wanted = size,
                    "pinned map keeps its size; run `kproxy cleanup` to apply a new size"
                );
            }
        }
    }
    Ok(ebpf)
}

/// Logs what loading one program cost: most of a start's wait is the
/// kernel verifying the TC ingress program, and the verifier's work grows
/// with the program's branches and loops.
fn log_loaded(name: &str, info: Option<aya::programs::ProgramInfo>, started: std::time::Instant) {
    let verified = info.and_then(|i| i.verified_instruction_count());
    debug!(
        program = name,
        elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
        verified_insns = verified,
        "eBPF program verified and loaded"
    );
}

/// Attaches the socket programs to `cgroup`, replacing (and releasing) a
/// link a previous instance pinned.
pub fn attach_cgroup(ebpf: &mut Ebpf, pin: &Path, cgroup: &Path) -> Result<(), DataplaneError> {
    let cg = File::open(cgroup)
        .map_err(|e| other(format!("opening cgroup {}: {e}", cgroup.display())))?;
    for name in CGROUP_PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| other(format!("program {name} missing from the object")))?
            .try_into()
            .map_err(|e| prog_err(name, "typing", e))?;
        let started = std::time::Instant::now();
        prog.load().map_err(|e| prog_err(name, "loading", e))?;
        log_loaded(name, prog.info().ok(), started);
        let id = prog
            .attach(&cg, CgroupAttachMode::Single)
            .map_err(|e| prog_err(name, &format!("attaching to {}", cgroup.display()), e))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(|e| prog_err(name, "taking link of", e))?
            .try_into()
            .map_err(|e| other(format!("link of {name}: {e}")))?;
        let path = links_dir(pin).join(format!("cgroup_{name}"));
        match PinnedLink::from_pin(&path) {
            Ok(old) => {
                // Releasing the old link detaches the old program.
                let _ = old.unpin();
            }
            Err(e) if not_found(&e) => {}
            Err(e) => warn!(path = %path.display(), error = %e, "ignoring unreadable pinned link"),
        }
        let _ = std::fs::remove_file(&path);
        link.pin(&path)
            .map_err(|e| other(format!("pinning {}: {e}", path.display())))?;
    }
    info!(cgroup = %cgroup.display(), "socket load balancing attached");
    Ok(())
}

/// Attaches the TC programs to each device (TCX), atomically replacing the
/// program of links pinned by a previous instance, and detaches pinned
/// links of devices no longer wanted.
pub fn attach_tc(ebpf: &mut Ebpf, pin: &Path, devices: &[Device]) -> Result<(), DataplaneError> {
    let mut wanted = Vec::new();
    for (name, ty, dir) in [
        (TC_INGRESS, TcAttachType::Ingress, "ingress"),
        (TC_EGRESS, TcAttachType::Egress, "egress"),
    ] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| other(format!("program {name} missing from the object")))?
            .try_into()
            .map_err(|e| prog_err(name, "typing", e))?;
        // Loaded once; later calls only attach to new devices.
        let started = std::time::Instant::now();
        match prog.load() {
            Ok(()) => log_loaded(name, prog.info().ok(), started),
            Err(aya::programs::ProgramError::AlreadyLoaded) => {}
            Err(e) => return Err(prog_err(name, "loading", e)),
        }
        for dev in devices {
            let file = format!("tc_{}_{dir}", dev.name);
            let path = links_dir(pin).join(&file);
            wanted.push(file);
            let replaced = match PinnedLink::from_pin(&path) {
                Ok(old) => {
                    let fd = FdLink::from(old);
                    match SchedClassifierLink::try_from(fd) {
                        Ok(link) => match prog.attach_to_link(link) {
                            Ok(id) => {
                                // The pin keeps the (updated) link; drop our fd.
                                let _ = prog.take_link(id);
                                true
                            }
                            Err(e) => {
                                warn!(path = %path.display(), error = %e, "pinned TC link not updatable; attaching anew");
                                false
                            }
                        },
                        Err(e) => {
                            warn!(path = %path.display(), error = %e, "pinned TC link unusable; attaching anew");
                            false
                        }
                    }
                }
                Err(e) if not_found(&e) => false,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "ignoring unreadable pinned link");
                    false
                }
            };
            if replaced {
                continue;
            }
            let _ = std::fs::remove_file(&path);
            let id = prog
                .attach_with_options(
                    &dev.name,
                    ty,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| prog_err(name, &format!("attaching ({dir}) to {}", dev.name), e))?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(|e| prog_err(name, "taking link of", e))?
                .try_into()
                .map_err(|e| other(format!("link of {name}: {e}")))?;
            link.pin(&path)
                .map_err(|e| other(format!("pinning {}: {e}", path.display())))?;
        }
    }
    // Devices that went away or were dropped from --devices.
    if let Ok(dir) = std::fs::read_dir(links_dir(pin)) {
        for entry in dir.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with("tc_") && !wanted.contains(&file) {
                release_link(&entry.path());
            }
        }
    }
    let names: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
    info!(devices = ?names, "TC programs attached");
    Ok(())
}

fn release_link(path: &Path) {
    match PinnedLink::from_pin(path) {
        Ok(l) => {
            let _ = l.unpin();
        }
        Err(_) => {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Detaches every pinned link and removes every pin under `pin`.
pub fn cleanup(pin: &Path) -> Result<(), DataplaneError> {
    if !pin.exists() {
        return Ok(());
    }
    if let Ok(dir) = std::fs::read_dir(links_dir(pin)) {
        for entry in dir.flatten() {
            release_link(&entry.path());
        }
    }
    if let Ok(dir) = std::fs::read_dir(maps_dir(pin)) {
        for entry in dir.flatten() {
            std::fs::remove_file(entry.path())
                .map_err(|e| other(format!("removing {}: {e}", entry.path().display())))?;
        }
    }
    for d in [links_dir(pin), maps_dir(pin), pin.to_path_buf()] {
        match std::fs::remove_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(other(format!("removing {}: {e}", d.display()))),
        }
    }
    info!(pin = %pin.display(), "removed kproxy's eBPF programs, links and maps");
    Ok(())
}
