//! Spans of guest memory that a descriptor chain names, shared by the virtio devices that
//! frame their requests by byte position rather than by descriptor.

use super::GuestMemory;
use vm_memory::{Address, Bytes, GuestAddress};

/// A span of guest memory, already checked to lie inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u64,
}

/// Splits spans at byte `at`: the first `at` bytes and the rest; `None` if shorter.
pub(crate) fn split_segments(
    segs: &[Segment],
    mut at: u64,
) -> Option<(Vec<Segment>, Vec<Segment>)> {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    for seg in segs {
        if at >= seg.len {
            head.push(*seg);
            at -= seg.len;
        } else if at > 0 {
            head.push(Segment {
                addr: seg.addr,
                len: at,
            });
            tail.push(Segment {
                addr: seg.addr.checked_add(at)?,
                len: seg.len - at,
            });
            at = 0;
        } else {
            tail.push(*seg);
        }
    }
    (at == 0).then_some((head, tail))
}

/// Reads exactly `buf.len()` bytes from the spans, in order; Err: the guest address that
/// could not be read (or the last span's, when the spans are too short).
pub(crate) fn read_segments(
    mem: &GuestMemory,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<(), u64> {
    let mut done = 0usize;
    for seg in segs {
        if done == buf.len() {
            break;
        }
        let n = usize::try_from(seg.len)
            .unwrap_or(usize::MAX)
            .min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + n], seg.addr)
            .map_err(|_| seg.addr.raw_value())?;
        done += n;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(segs.last().map_or(0, |s| s.addr.raw_value()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_inside_and_between_spans() {
        let s = |a, l| Segment {
            addr: GuestAddress(a),
            len: l,
        };
        let segs = [s(0x1000, 16), s(0x2000, 8)];
        assert_eq!(
            split_segments(&segs, 16),
            Some((vec![s(0x1000, 16)], vec![s(0x2000, 8)]))
        );
        assert_eq!(
            split_segments(&segs, 20),
            Some((vec![s(0x1000, 16), s(0x2000, 4)], vec![s(0x2004, 4)]))
        );
        assert_eq!(split_segments(&segs, 24), Some((segs.to_vec(), vec![])));
        assert_eq!(split_segments(&segs, 25), None);
    }
}
