//! Any change to a valid .bpk file must be detected.
//!
//! Starts from the valid file `seeds/tiny.bpk` (built into the binary) and reads the fuzzer's
//! bytes as a list of 5-byte edits: a little-endian u32 offset (taken modulo the file length)
//! and a byte XORed into the file there. A trailing partial edit is ignored. When the edited
//! file differs from the original in at least one byte, `validate_bytes` must report a problem:
//! the preamble and header are covered by the header checksum, tensor data by per-tensor
//! checksums, and every padding byte must be zero.

#![no_main]

use std::sync::Once;

use bitnet_pack::format::validate_bytes;
use libfuzzer_sys::fuzz_target;

static SEED: &[u8] = include_bytes!("../seeds/tiny.bpk");
static SEED_CHECKED: Once = Once::new();

fuzz_target!(|data: &[u8]| {
    // An invalid seed would make every assertion below pass trivially.
    SEED_CHECKED.call_once(|| {
        let report = validate_bytes(SEED);
        assert!(
            report.ok(),
            "seeds/tiny.bpk does not validate (rebuild it, see README.md): {:?}",
            report.findings
        );
    });
    let mut bytes = SEED.to_vec();
    for edit in data.chunks_exact(5) {
        let offset = u32::from_le_bytes([edit[0], edit[1], edit[2], edit[3]]) as usize;
        bytes[offset % SEED.len()] ^= edit[4];
    }
    // Edits with a zero XOR byte, or several edits at one offset that cancel out, leave the
    // file unchanged; only a real change has to be caught.
    if bytes == SEED {
        return;
    }
    let report = validate_bytes(&bytes);
    if report.ok() {
        let changed: Vec<usize> = (0..SEED.len()).filter(|&i| bytes[i] != SEED[i]).collect();
        panic!("modification not detected: bytes changed at offsets {changed:?}");
    }
});
