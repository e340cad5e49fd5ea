//! Decoding: how fast raw messages become typed events.

use std::time::{Duration, Instant};

use tokio_uffd::Event;

/// 64 page-fault messages as the kernel writes them.
pub fn fault_messages() -> Vec<[u8; 32]> {
    (0..64u64)
        .map(|i| {
            let mut m = [0u8; 32];
            m[0] = 0x12;
            m[8..16].copy_from_slice(&(i & 1).to_ne_bytes());
            m[16..24].copy_from_slice(&(0x7f00_0000_0000 + i * 4096).to_ne_bytes());
            m
        })
        .collect()
}

/// Decodes every message `rounds` times: the time taken.
pub fn decode(msgs: &[[u8; 32]], rounds: usize) -> Duration {
    let t0 = Instant::now();
    let mut sum = 0usize;
    for _ in 0..rounds {
        for m in msgs {
            if let Ok(tokio_uffd::RawEvent::Event(Event::PageFault(f))) =
                tokio_uffd::decode_message(std::hint::black_box(m), false)
            {
                sum = sum.wrapping_add(f.address);
            }
        }
    }
    std::hint::black_box(sum);
    t0.elapsed()
}
