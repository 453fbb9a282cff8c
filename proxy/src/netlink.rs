//! Reading netlink replies: the part ctnetlink (UDP conntrack cleanup) and
//! rtnetlink (the devices of the interface detect-local modes) share.

use std::fmt::Debug;
use std::io;

use netlink_packet_core::{NetlinkDeserializable, NetlinkMessage};
use netlink_sys::{Socket, SocketAddr};

/// A netlink socket of `protocol` talking to the kernel, in the calling
/// thread's network namespace.
pub fn connected(protocol: isize) -> io::Result<Socket> {
    let mut socket = Socket::new(protocol)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// Reads replies from `socket` into `buf` until `each` says the exchange is
/// over (returns `true`); `each` sees every message in order.
pub fn read_until<T: NetlinkDeserializable + Debug>(
    socket: &Socket,
    buf: &mut [u8],
    mut each: impl FnMut(&NetlinkMessage<T>) -> io::Result<bool>,
) -> io::Result<()> {
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < n {
            let msg = <NetlinkMessage<T>>::deserialize(&buf[offset..n])
                .map_err(|e| io::Error::other(format!("bad netlink message: {e}")))?;
            let len = msg.header.length as usize;
            if each(&msg)? {
                return Ok(());
            }
            if len == 0 {
                break;
            }
            offset += (len + 3) & !3;
        }
    }
}
