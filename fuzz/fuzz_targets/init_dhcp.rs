//! shoal-init's dhcp decoder on any bytes: see `shoal_init::fuzzing::dhcp`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_init::fuzzing::dhcp(data));
