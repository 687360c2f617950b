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
//! Callers check that the buffer holds the whole structure first; a field past its end panics
//! like any out-of-bounds slice index.

use std::marker::PhantomData;

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
    pub fn get(&self, b: &[u8]) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&b[self.offset..self.offset + N]);
        out
    }
    pub fn set(&self, b: &mut [u8], v: &[u8; N]) {
        b[self.offset..self.offset + N].copy_from_slice(v);
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
        assert_eq!(U.get(&b), [9, 8, 7, 6]);
    }
}
