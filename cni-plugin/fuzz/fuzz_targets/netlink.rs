//! The netlink answer parser: whatever the bytes, an answer or an error, never a panic.
#![no_main]

use ambient_cni::sys::{parse_getlink_reply, LinkSelector};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_getlink_reply(data, 1, &LinkSelector::Index(2));
    let _ = parse_getlink_reply(data, 0, &LinkSelector::Name("eth0".into()));
});
