//! The .bpk file format, version 1: one module that reads and writes it.
//! The byte-exact spec is `formats/bpk.md`; every constant here names its section.
//!
//! ```text
//! 0      preamble (64 bytes, §2)
//! 64     header: UTF-8 JSON padded with spaces to `header_len` bytes (§3)
//! ...    zero bytes up to `data_offset` (a multiple of 64)
//! data   tensors, each at a 64-byte aligned offset, zero padding between (§4)
//! end    = data_offset + data_len (data_len is a multiple of 64)
//! ```

pub mod header;
pub mod reader;
pub mod validate;
pub mod writer;

pub use header::{Compression, Encoding, Header, Provenance, QuantScheme, SourceFile, TensorEntry};
pub use reader::{BpkFile, FormatError, Storage};
pub use validate::{
    Finding, ValidationReport, ValidationSummary, validate_bytes, validate_bytes_into,
    validate_file, validate_file_into,
};
pub use writer::{BpkWriter, Finished, TensorPlan, WriteError};

/// File magic (§2). PNG-style: a high-bit byte and CR LF / SUB / LF catch 7-bit and text-mode
/// transfers.
pub const MAGIC: [u8; 8] = *b"\x89BPK\r\n\x1a\n";
/// Size of the fixed preamble (§2).
pub const PREAMBLE_LEN: usize = 64;
/// Alignment of the data section and of every tensor inside it (§4).
pub const ALIGNMENT: u64 = 64;
/// Largest header we write or read (§3).
pub const MAX_HEADER_LEN: u64 = 64 << 20;
/// Most tensors a header may list (§3).
pub const MAX_TENSORS: usize = 1 << 20;
/// Most dimensions a tensor may have (§3).
pub const MAX_RANK: usize = 8;
/// Longest tensor name in bytes (§3).
pub const MAX_NAME_LEN: usize = 1024;
/// The major version this build reads and writes (§2.1).
pub const VERSION_MAJOR: u16 = 1;
/// The minor version this build writes; it reads any minor of [`VERSION_MAJOR`] (§2.1).
pub const VERSION_MINOR: u16 = 3;
/// Preamble flag (§2, 1.1): the quantization scheme needs more than BitNet b1.58 (another
/// activation rule or eps, per-site rules, online transforms, quantized attention states or a
/// residual rotation); a reader that does not implement §3.2 of 1.1 must refuse the file.
pub const FLAG_EXTENDED_QUANT: u32 = 1;
/// Preamble flag (§2, 1.2): some tensor uses the `t5` encoding (§5.3); a reader that does not
/// implement it must refuse the file (a 1.0 or 1.1 reader does, as it refuses any bit but 0).
pub const FLAG_DENSE_TERNARY: u32 = 2;
/// Preamble flag (§2, 1.3): some tensor uses the `q8_0` encoding (§5.5); a reader that does
/// not implement it must refuse the file (a 1.2 or older reader does, as it refuses bit 2).
pub const FLAG_BLOCK_Q8: u32 = 4;
/// Every flag this build understands.
pub const KNOWN_FLAGS: u32 = FLAG_EXTENDED_QUANT | FLAG_DENSE_TERNARY | FLAG_BLOCK_Q8;
/// Byte the header JSON is padded with (§3).
pub const HEADER_PAD: u8 = b' ';

/// `n` rounded up to a multiple of [`ALIGNMENT`], or `None` on overflow.
pub fn align_up(n: u64) -> Option<u64> {
    n.checked_add(ALIGNMENT - 1)
        .map(|v| v / ALIGNMENT * ALIGNMENT)
}

/// Offset of the data section for a header of `header_len` bytes (§2).
pub fn data_offset_for(header_len: u64) -> Option<u64> {
    align_up(PREAMBLE_LEN as u64 + header_len)
}

/// The decoded format version (§2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatVersion {
    /// Version 1.x. Minor versions only add optional header fields.
    V1 { minor: u16 },
}

impl FormatVersion {
    /// Decodes the version fields of a preamble.
    pub fn decode(major: u16, minor: u16) -> Result<Self, FormatError> {
        match major {
            1 => Ok(FormatVersion::V1 { minor }),
            _ => Err(FormatError::UnsupportedVersion { major, minor }),
        }
    }
}

/// The fixed 64-byte preamble (§2). All integers little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    pub major: u16,
    pub minor: u16,
    /// Bit 0: [`FLAG_EXTENDED_QUANT`]; bit 1: [`FLAG_DENSE_TERNARY`]; the other bits are
    /// reserved and zero.
    pub flags: u32,
    pub header_len: u64,
    pub data_offset: u64,
    /// SHA-256 over bytes 0..32 of the preamble followed by the `header_len` header bytes.
    pub header_sha256: [u8; 32],
}

const _: () = assert!(8 + 2 + 2 + 4 + 8 + 8 + 32 == PREAMBLE_LEN);

impl Preamble {
    /// The first 32 bytes: everything but the checksum (which covers them).
    pub fn head_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.major.to_le_bytes());
        b[10..12].copy_from_slice(&self.minor.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.header_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.data_offset.to_le_bytes());
        b
    }

    /// All 64 bytes.
    pub fn to_bytes(&self) -> [u8; PREAMBLE_LEN] {
        let mut b = [0u8; PREAMBLE_LEN];
        b[..32].copy_from_slice(&self.head_bytes());
        b[32..].copy_from_slice(&self.header_sha256);
        b
    }

    /// Parses the preamble fields; checks only the magic (the rest is checked by the reader,
    /// which knows the file length).
    pub fn parse(b: &[u8; PREAMBLE_LEN]) -> Result<Self, FormatError> {
        if b[..8] != MAGIC {
            return Err(FormatError::BadMagic {
                found: b[..8].try_into().expect("8-byte slice"),
            });
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4-byte slice"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8-byte slice"));
        Ok(Preamble {
            major: u16_at(8),
            minor: u16_at(10),
            flags: u32_at(12),
            header_len: u64_at(16),
            data_offset: u64_at(24),
            header_sha256: b[32..64].try_into().expect("32-byte slice"),
        })
    }

    /// The checksum over the preamble head and the header bytes.
    pub fn compute_sha256(head: &[u8; 32], header: &[u8]) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(head);
        h.update(header);
        h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_round_trip() {
        let p = Preamble {
            major: 1,
            minor: 7,
            flags: 0,
            header_len: 1234,
            data_offset: 1344,
            header_sha256: [9; 32],
        };
        assert_eq!(Preamble::parse(&p.to_bytes()).unwrap(), p);
        let mut bad = p.to_bytes();
        bad[0] = b'G';
        assert!(matches!(
            Preamble::parse(&bad),
            Err(FormatError::BadMagic { .. })
        ));
    }

    #[test]
    fn alignment_helpers() {
        assert_eq!(align_up(0), Some(0));
        assert_eq!(align_up(1), Some(64));
        assert_eq!(align_up(128), Some(128));
        assert_eq!(align_up(u64::MAX), None);
        assert_eq!(data_offset_for(0), Some(64));
        assert_eq!(data_offset_for(1), Some(128));
    }

    #[test]
    fn versions() {
        assert_eq!(
            FormatVersion::decode(1, 9).unwrap(),
            FormatVersion::V1 { minor: 9 }
        );
        assert!(matches!(
            FormatVersion::decode(2, 0),
            Err(FormatError::UnsupportedVersion { major: 2, minor: 0 })
        ));
    }
}
