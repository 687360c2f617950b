//! Named fields of on-disk structures: one table of `Field` constants per structure (offset and
//! width in the type), used by both the reader and the writer of that structure, so a layout is
//! spelled once. Little-endian by default (`Le`), big-endian for qcow2 (`Be`).
//!
//! ```
//! use diskferry_layout::field::{Field, Le};
//! const MAGIC: Field<u16, Le> = Field::at(0x38);
//! let mut sb = [0u8; 1024];
//! MAGIC.set(&mut sb, 0xEF53);
//! assert_eq!(MAGIC.get(&sb), 0xEF53);
//! assert_eq!(sb[0x38], 0x53);
//! ```
//!
//! Besides integers: [`Bytes`] (fixed byte arrays: signatures, labels), [`GuidField`] (a
//! [`Guid`]), [`Utf16`] (NUL-padded UTF-16 text) and [`Records`] (arrays of fixed-size entries,
//! each with a field table of its own). Conventionally a structure's table is a module of
//! constants named after the specification's fields, with `LEN` its size in bytes.
//!
//! Callers check that the buffer holds the whole structure first; a field past its end panics
//! like any out-of-bounds slice index.

use std::marker::PhantomData;

use crate::Guid;

/// Little-endian byte order.
#[derive(Debug, Clone, Copy)]
pub struct Le;
/// Big-endian byte order.
#[derive(Debug, Clone, Copy)]
pub struct Be;

/// An integer of type `T` at a fixed byte offset, in byte order `E`.
#[derive(Debug, Clone, Copy)]
pub struct Field<T, E = Le> {
    pub offset: usize,
    _t: PhantomData<(T, E)>,
}

impl<T, E> Field<T, E> {
    pub const fn at(offset: usize) -> Self {
        Field {
            offset,
            _t: PhantomData,
        }
    }

    /// The byte just past this field.
    pub const fn end(&self) -> usize
    where
        T: Width,
    {
        self.offset + T::BYTES
    }
}

/// Integer types a field can hold.
pub trait Width: Copy {
    const BYTES: usize;
}

macro_rules! field_int {
    ($($t:ty),*) => {$(
        impl Width for $t {
            const BYTES: usize = std::mem::size_of::<$t>();
        }
        impl Field<$t, Le> {
            pub fn get(&self, b: &[u8]) -> $t {
                let mut raw = [0u8; std::mem::size_of::<$t>()];
                raw.copy_from_slice(&b[self.offset..self.offset + std::mem::size_of::<$t>()]);
                <$t>::from_le_bytes(raw)
            }
            pub fn set(&self, b: &mut [u8], v: $t) {
                b[self.offset..self.offset + std::mem::size_of::<$t>()]
                    .copy_from_slice(&v.to_le_bytes());
            }
        }
        impl Field<$t, Be> {
            pub fn get(&self, b: &[u8]) -> $t {
                let mut raw = [0u8; std::mem::size_of::<$t>()];
                raw.copy_from_slice(&b[self.offset..self.offset + std::mem::size_of::<$t>()]);
                <$t>::from_be_bytes(raw)
            }
            pub fn set(&self, b: &mut [u8], v: $t) {
                b[self.offset..self.offset + std::mem::size_of::<$t>()]
                    .copy_from_slice(&v.to_be_bytes());
            }
        }
    )*};
}
field_int!(u8, u16, u32, u64);

/// A fixed-size byte array at an offset (UUIDs, labels, boot code).
#[derive(Debug, Clone, Copy)]
pub struct Bytes<const N: usize> {
    pub offset: usize,
}

impl<const N: usize> Bytes<N> {
    pub const fn at(offset: usize) -> Self {
        Bytes { offset }
    }
    /// The byte just past this field.
    pub const fn end(&self) -> usize {
        self.offset + N
    }
    pub fn get(&self, b: &[u8]) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&b[self.offset..self.offset + N]);
        out
    }
    pub fn set(&self, b: &mut [u8], v: &[u8; N]) {
        b[self.offset..self.offset + N].copy_from_slice(v);
    }
}

impl<T: Width, E> Field<T, E> {
    /// The bytes of `b` before and after this field. A checksum stored inside the structure it
    /// covers (VHDX headers, GPT headers) is computed over `before`, the field as zeros, `after`.
    pub fn around<'b>(&self, b: &'b [u8]) -> (&'b [u8], &'b [u8]) {
        (&b[..self.offset], &b[self.end()..])
    }
}

/// A [`Guid`] (16 bytes in on-disk order) at an offset.
#[derive(Debug, Clone, Copy)]
pub struct GuidField {
    pub offset: usize,
}

impl GuidField {
    pub const fn at(offset: usize) -> Self {
        GuidField { offset }
    }
    /// The byte just past this field.
    pub const fn end(&self) -> usize {
        self.offset + 16
    }
    pub fn get(&self, b: &[u8]) -> Guid {
        Guid(Bytes::<16>::at(self.offset).get(b))
    }
    pub fn set(&self, b: &mut [u8], v: Guid) {
        Bytes::<16>::at(self.offset).set(b, &v.0);
    }
}

/// Text of at most `UNITS` little-endian UTF-16 code units at an offset, NUL-padded (GPT
/// partition names, the VHDX creator).
#[derive(Debug, Clone, Copy)]
pub struct Utf16<const UNITS: usize> {
    pub offset: usize,
}

impl<const UNITS: usize> Utf16<UNITS> {
    pub const fn at(offset: usize) -> Self {
        Utf16 { offset }
    }
    /// The byte just past this field.
    pub const fn end(&self) -> usize {
        self.offset + 2 * UNITS
    }

    /// The text up to the first NUL; unpaired surrogates become U+FFFD.
    pub fn get(&self, b: &[u8]) -> String {
        let units: Vec<u16> = b[self.offset..self.offset + 2 * UNITS]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        String::from_utf16_lossy(&units)
    }

    /// Writes `text` cut to `UNITS` code units, zero-filling the rest of the field.
    pub fn set(&self, b: &mut [u8], text: &str) {
        let field = &mut b[self.offset..self.offset + 2 * UNITS];
        field.fill(0);
        for (slot, unit) in field.chunks_exact_mut(2).zip(text.encode_utf16()) {
            slot.copy_from_slice(&unit.to_le_bytes());
        }
    }
}

/// An array of fixed-size records from `offset` (partition entries, region and metadata table
/// entries, directory entries): record `i` is `size` bytes at `offset + i * size`, and its own
/// field table applies to the slice [`Records::get`] returns.
#[derive(Debug, Clone, Copy)]
pub struct Records {
    pub offset: usize,
    pub size: usize,
}

impl Records {
    pub const fn new(offset: usize, size: usize) -> Self {
        Records { offset, size }
    }

    /// Byte offset of record `i`.
    pub const fn at(&self, i: usize) -> usize {
        self.offset + i * self.size
    }

    /// How many whole records fit in a structure of `len` bytes.
    pub const fn fit(&self, len: usize) -> usize {
        len.saturating_sub(self.offset) / self.size
    }

    pub fn get<'b>(&self, b: &'b [u8], i: usize) -> &'b [u8] {
        &b[self.at(i)..self.at(i + 1)]
    }

    pub fn get_mut<'b>(&self, b: &'b mut [u8], i: usize) -> &'b mut [u8] {
        &mut b[self.at(i)..self.at(i + 1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_what_it_writes_in_both_orders() {
        let mut b = [0u8; 16];
        const A: Field<u32, Le> = Field::at(2);
        const B: Field<u64, Be> = Field::at(8);
        A.set(&mut b, 0x1122_3344);
        B.set(&mut b, 0x0102_0304_0506_0708);
        assert_eq!(A.get(&b), 0x1122_3344);
        assert_eq!(b[2..6], [0x44, 0x33, 0x22, 0x11]);
        assert_eq!(B.get(&b), 0x0102_0304_0506_0708);
        assert_eq!(b[8], 1);
        assert_eq!(A.end(), 6);
        const U: Bytes<4> = Bytes::at(12);
        U.set(&mut b, &[9, 8, 7, 6]);
        assert_eq!((U.get(&b), U.end()), ([9, 8, 7, 6], 16));
        let (before, after) = A.around(&b);
        assert_eq!((before.len(), after.len()), (2, 10));
    }

    #[test]
    fn guids_text_and_records() {
        let mut b = [0u8; 64];
        const G: GuidField = GuidField::at(4);
        let g = Guid::from_fields(0x0102_0304, 0x0506, 0x0708, [9, 10, 11, 12, 13, 14, 15, 16]);
        G.set(&mut b, g);
        assert_eq!(G.get(&b), g);
        assert_eq!(b[4..8], [4, 3, 2, 1]);
        const NAME: Utf16<4> = Utf16::at(20);
        NAME.set(&mut b, "héllo");
        assert_eq!(NAME.get(&b), "héll");
        NAME.set(&mut b, "ab");
        assert_eq!((NAME.get(&b).as_str(), b[24]), ("ab", 0));
        const R: Records = Records::new(32, 8);
        assert_eq!((R.at(2), R.fit(64), R.fit(20)), (48, 4, 0));
        R.get_mut(&mut b, 1)[0] = 7;
        assert_eq!(R.get(&b, 1)[0], 7);
    }
}
