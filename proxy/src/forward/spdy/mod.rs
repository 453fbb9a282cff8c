//! SPDY/3.1, as kubectl and the kubelet speak it for port-forward
//! (`portforward.k8s.io`). No maintained crate offers it (the one SPDY/3.1
//! crate on crates.io is GPL-3.0, which kproxy's Apache-2.0 cannot take),
//! so this is a small implementation of what these peers use: the frames
//! ([`frame`]) and a client session multiplexing streams over one upgraded
//! connection ([`session`]).

pub mod dictionary;
pub mod frame;
pub mod session;

pub use session::{Session, SessionError, Stream, StreamEvent, StreamSender};
