//! shoal-init's network_config decoder on any bytes: see `shoal_init::fuzzing::network_config`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_init::fuzzing::network_config(data));
