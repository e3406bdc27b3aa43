//! Embedding lookup and its backward (kernels/embedding.cu).

use anyhow::{bail, ensure, Result};

use super::launch::{kernel, launch, per_row};
use super::runtime::Gpu;
use super::{expect_dtype, input, output, tensor, CudaStorage};
use crate::tensor::Tensor;

fn check_ids(op: &str, ids: &[u32], vocab: usize) -> Result<()> {
    if let Some((pos, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        bail!("{op}: id {id} at position {pos} is out of range for a table of {vocab} rows");
    }
    Ok(())
}

/// `(vocab, dim)` of a 2-D table.
fn table_shape(op: &str, table: &Tensor) -> Result<(usize, usize)> {
    match *table.shape() {
        [vocab, dim] => Ok((vocab, dim)),
        _ => bail!("{op}: table must be 2-D, got {:?}", table.shape()),
    }
}

pub(crate) fn lookup(gpu: &'static Gpu, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    const OP: &str = "embedding";
    let (vocab, dim) = table_shape(OP, table)?;
    check_ids(OP, ids, vocab)?;
    let kernel = kernel!("kdx_embedding", table.dtype());
    let table_ptr = input(gpu, OP, "table", table)?.ptr();
    let ids_buf = gpu.upload(bytemuck::cast_slice(ids))?;
    let mut out = CudaStorage::alloc(gpu, ids.len() * dim, table.dtype())?;
    // SAFETY: kdx_embedding_<T>(const T* table, const uint32_t* ids, T* out, size_t dim): table
    // [vocab, dim] with every id below vocab, out [ids, dim]; one block per id.
    unsafe {
        launch!(
            gpu,
            kernel,
            per_row(ids.len(), dim)?,
            [table_ptr, gpu.ptr(&ids_buf), out.ptr_mut()?, dim]
        )
    }?;
    tensor(out, &[ids.len(), dim])
}

/// `dtable[ids[i]] += dy[i]`, reproducibly and without atomics: the host groups the positions by
/// id (a stable sort, so each group keeps position order) and one block owns each distinct id's
/// table row, adding its rows of `dy` in position order. Grouping on the host is cheap (the ids
/// are already there, one u32 per token) and makes every table element a single thread's.
pub(crate) fn scatter_add(
    gpu: &'static Gpu,
    dy: &Tensor,
    ids: &[u32],
    dtable: &mut Tensor,
) -> Result<()> {
    const OP: &str = "embedding backward";
    let (vocab, dim) = table_shape(OP, dtable)?;
    ensure!(
        dy.rows_cols() == (ids.len(), dim),
        "{OP}: dy is {:?}, expected [{}, {dim}]",
        dy.shape(),
        ids.len()
    );
    check_ids(OP, ids, vocab)?;
    expect_dtype(OP, "dy", dy, dtable.dtype())?;
    let kernel = kernel!("kdx_embedding_backward", dtable.dtype());
    let (index, groups) = group_by_id(ids)?;
    let index_buf = gpu.upload(bytemuck::cast_slice(&index))?;
    let dy_ptr = input(gpu, OP, "dy", dy)?.ptr();
    let table_ptr = output(gpu, OP, "dtable", dtable)?.ptr_mut()?;
    let n = ids.len();
    // SAFETY: kdx_embedding_backward_<T>(const T* dy, const uint32_t* index, size_t n,
    // size_t groups, size_t dim, T* dtable): dy [n, dim], dtable [vocab, dim], index laid out as
    // `group_by_id` documents; one block per group.
    unsafe {
        launch!(
            gpu,
            kernel,
            per_row(groups, dim)?,
            [dy_ptr, gpu.ptr(&index_buf), n, groups, dim, table_ptr]
        )
    }
}

/// The positions `0..n` grouped by id, as one array: `[positions (n) | the id of each of the g
/// groups (g) | group boundaries (g + 1)]`, group `k` being `positions[bounds[k]..bounds[k + 1]]`,
/// in ascending position order; and g.
fn group_by_id(ids: &[u32]) -> Result<(Vec<u32>, usize)> {
    ensure!(
        u32::try_from(ids.len()).is_ok(),
        "embedding backward: {} ids do not fit the 32-bit index",
        ids.len()
    );
    let mut positions: Vec<u32> = (0..ids.len() as u32).collect();
    // Stable: equal ids keep their position order.
    positions.sort_by_key(|&p| ids[p as usize]);
    let mut group_ids = Vec::new();
    let mut bounds = Vec::new();
    for (k, &p) in positions.iter().enumerate() {
        if group_ids.last() != Some(&ids[p as usize]) {
            group_ids.push(ids[p as usize]);
            bounds.push(k as u32);
        }
    }
    bounds.push(ids.len() as u32);
    let groups = group_ids.len();
    let mut index = positions;
    index.extend_from_slice(&group_ids);
    index.extend_from_slice(&bounds);
    Ok((index, groups))
}

#[cfg(test)]
mod tests {
    use super::group_by_id;

    #[test]
    fn groups_keep_position_order() {
        // ids by position: 5 2 5 0 2 5
        let (index, groups) = group_by_id(&[5, 2, 5, 0, 2, 5]).unwrap();
        assert_eq!(groups, 3);
        let (positions, rest) = index.split_at(6);
        let (group_ids, bounds) = rest.split_at(3);
        assert_eq!(positions, [3, 1, 4, 0, 2, 5]);
        assert_eq!(group_ids, [0, 2, 5]);
        assert_eq!(bounds, [0, 1, 3, 6]);
    }

    #[test]
    fn no_ids_no_groups() {
        assert_eq!(group_by_id(&[]).unwrap(), (vec![0], 0));
    }
}
