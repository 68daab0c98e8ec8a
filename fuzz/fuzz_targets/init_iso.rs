//! shoal-init's iso decoder on any bytes: see `shoal_init::fuzzing::iso`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_init::fuzzing::iso(data));
