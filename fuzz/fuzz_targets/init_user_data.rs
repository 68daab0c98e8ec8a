//! shoal-init's user_data decoder on any bytes: see `shoal_init::fuzzing::user_data`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_init::fuzzing::user_data(data));
