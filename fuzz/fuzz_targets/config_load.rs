#![no_main]
//! Any UTF-8 text to `Config::from_toml`. Property: `idemproxy_fuzz::check_config_bytes`
//! (fuzz/src/lib.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    idemproxy_fuzz::check_config_bytes(data);
});
