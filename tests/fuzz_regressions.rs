//! Replays the kept fuzz inputs (`fuzz/regressions/<target>/`: seeds and minimised crashes)
//! through the very properties the cargo-fuzz targets check (`fuzz/src/lib.rs`, included below),
//! so CI guards them without cargo-fuzz or a nightly toolchain. Files named `seed-*` must also
//! still be accepted (a valid key, record or configuration), so the seeds cannot rot.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

#[path = "../fuzz/src/lib.rs"]
mod checks;

/// Feeds every file of `fuzz/regressions/<target>/` to `check`, naming the file that fails.
fn replay(target: &str, check: fn(&[u8]) -> bool) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no inputs in {}", dir.display());
    let mut failures = Vec::new();
    for path in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match catch_unwind(AssertUnwindSafe(|| check(&data))) {
            Ok(false) if name.starts_with("seed-") => failures.push(format!("{name}: seed no longer accepted")),
            Ok(_) => {}
            Err(_) => failures.push(format!("{name}: property failed (panic above)")),
        }
    }
    assert!(failures.is_empty(), "{target}: {failures:#?}");
}

/// One test per fuzz target, named after it: `target => the property its inputs must keep`.
macro_rules! replay_each_target {
    ($($target:ident => $check:path),* $(,)?) => {
        $(
            #[test]
            fn $target() {
                replay(stringify!($target), $check);
            }
        )*
    };
}

replay_each_target! {
    key_parser => checks::check_key,
    record_decode => checks::check_record,
    json_canonical => checks::check_canonical,
    json_pointer => checks::check_pointer,
    config_load => checks::check_config_bytes,
    config_structured => checks::check_config_structured,
}

#[test]
fn structured_generator_emits_known_keys() {
    let text = checks::structured_toml(&[0, 0, 1, 41, 30, 9, 20, 17]);
    assert_eq!(
        text,
        "[[route]]\nprefix = \"/pay\"\nupstream.url = \"http://127.0.0.1:3000\"\n"
    );
    assert!(
        checks::VALUES.len() < 0xf0,
        "every value must be reachable by a byte below 0xF0"
    );
}

#[test]
fn disk_recovery() {
    replay("disk_recovery", checks::check_disk_recovery);
}
