use kiln_ir::{Activation, DType, RopeLayout};
use kiln_ptx::{kernels, ptx};
fn main() {
    let mut ks = vec![];
    for d in [DType::F32, DType::F16, DType::BF16, DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0] {
        ks.push(kernels::matmul(d, false));
        ks.push(kernels::matmul(d, true));
    }
    ks.push(kernels::binary(ptx::BinOp::Add));
    ks.push(kernels::binary(ptx::BinOp::Mul));
    ks.push(kernels::scale());
    for a in [Activation::Silu, Activation::GeluTanh] {
        ks.push(kernels::act(a));
        ks.push(kernels::glu(a));
    }
    ks.push(kernels::rms_norm(true));
    ks.push(kernels::rms_norm(false));
    ks.push(kernels::softmax());
    ks.push(kernels::rope(RopeLayout::Neox));
    ks.push(kernels::rope(RopeLayout::Interleaved));
    ks.push(kernels::kv_append());
    ks.push(kernels::attention(64, false));
    ks.push(kernels::attention(256, true));
    ks.push(kernels::attn_combine());
    ks.push(kernels::argmax());
    print!("{}", ptx::print_module(&ks));
}
