//! The WGSL `kq2_rotate` kernel against `kiln_ptx::formats_k::rotate_host`, bit for bit,
//! on whatever adapter wgpu finds (skipped without one, unless `KILN_REQUIRE_WGPU=1`).

use std::collections::HashMap;

use kiln_ptx::device::Device;
use kiln_ptx::emu::Arg;
use kiln_wgpu::WgpuDevice;

#[test]
fn kq2_rotate_matches_the_host_rotation() {
    if let Err(e) = kiln_wgpu::device::open_device() {
        assert!(std::env::var("KILN_REQUIRE_WGPU").as_deref() != Ok("1"), "KILN_REQUIRE_WGPU=1 but {e}");
        eprintln!("skipped: {e}");
        return;
    }
    let k = kiln_wgpu::kernels::kq2_rotate();
    let sources = HashMap::from([(k.name.clone(), k.source())]);
    let mut dev = WgpuDevice::new(std::slice::from_ref(&k), &sources).expect("device");
    // 3 chunks: the second workgroup's upper half lies past n.
    for n in [64usize, 192, 64 * 37] {
        let mut r: u64 = n as u64;
        let x: Vec<f32> = (0..n)
            .map(|_| {
                r = r.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((r >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        let want = kiln_ptx::formats_k::rotate_host(&x, 64);
        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let xa = dev.alloc(4 * n).expect("alloc");
        // A sentinel after n: the kernel must not write past it.
        let ya = dev.alloc(4 * (n + 128)).expect("alloc");
        dev.upload(xa, &bytes).expect("upload");
        dev.upload(ya, &vec![0xffu8; 4 * (n + 128)]).expect("upload");
        let grid = [(n as u32).div_ceil(kiln_wgpu::kernels::BLOCK), 1, 1];
        dev.launch(&k.name, grid, &[Arg::Ptr(xa), Arg::Ptr(ya), Arg::U32(n as u32)]).expect("launch");
        let mut out = vec![0u8; 4 * (n + 128)];
        dev.download(ya, &mut out).expect("download");
        let got: Vec<u32> = out.chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        for (i, w) in want.iter().enumerate() {
            assert_eq!(got[i], w.to_bits(), "n = {n}, element {i}: {} vs {w}", f32::from_bits(got[i]));
        }
        assert!(got[n..].iter().all(|&w| w == u32::MAX), "n = {n}: written past n");
    }
}
