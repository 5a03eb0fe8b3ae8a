//! Read-only analyses of a module's graph that passes and tools share.

use crate::entities::ValueId;
use crate::module::Module;
use crate::ops::Op;

/// The residual stream of a decoder: the value after the embedding (and its
/// scaling, if any), then every residual `add` that continues it, in order. A
/// `steer` op applied to the stream stands in for the value it steers.
pub fn residual_stream(m: &Module) -> Result<Vec<ValueId>, String> {
    let mut r = m
        .insts
        .iter()
        .position(|i| matches!(i.op, Op::Embed { .. }))
        .map(|i| ValueId(i as u32))
        .ok_or("the module has no embedding, so it has no residual stream")?;
    let users = |v: ValueId| m.insts.iter().enumerate().filter(move |(_, i)| i.op.values().contains(&v));
    // An embedding scale (Gemma) whose only user is the stream's start.
    let embed_users: Vec<_> = users(r).collect();
    if let [(i, inst)] = embed_users.as_slice()
        && matches!(inst.op, Op::Scale { .. })
    {
        r = ValueId(*i as u32);
    }
    let mut stream = vec![r];
    loop {
        let next = users(r).find_map(|(i, inst)| match inst.op {
            Op::Add { a, b } if a == r || b == r => Some((i, true)),
            Op::Steer { x, .. } if x == r => Some((i, false)),
            _ => None,
        });
        let Some((i, is_add)) = next else { break };
        r = ValueId(i as u32);
        if is_add {
            stream.push(r);
        } else if let Some(last) = stream.last_mut() {
            *last = r;
        }
    }
    Ok(stream)
}

/// The output of every transformer layer (the residual stream after the layer's
/// last residual `add`), for a decoder with `n_layers` in its metadata whose
/// layers all add to the stream the same number of times.
pub fn layer_outputs(m: &Module) -> Result<Vec<ValueId>, String> {
    let n_layers = m
        .meta_int("n_layers")
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n > 0)
        .ok_or("the module's metadata has no positive `n_layers`")?;
    let stream = residual_stream(m)?;
    let adds = &stream[1..];
    if adds.is_empty() || adds.len() % n_layers != 0 {
        return Err(format!(
            "the residual stream has {} adds, which do not split evenly into {n_layers} layers",
            adds.len()
        ));
    }
    let per_layer = adds.len() / n_layers;
    Ok(adds.chunks(per_layer).map(|c| c[per_layer - 1]).collect())
}

/// For each value, the index of the last instruction that reads it (`None`: never read).
/// Backends that reuse activation buffers free a value's buffer after that instruction.
pub fn last_uses(m: &Module) -> Vec<Option<usize>> {
    let mut last = vec![None; m.insts.len()];
    for (i, inst) in m.insts.iter().enumerate() {
        for v in inst.op.values() {
            if let Some(slot) = last.get_mut(v.index()) {
                *slot = Some(i);
            }
        }
    }
    last
}
