fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap();
    let a = lcm::motion::npy::read(std::path::Path::new(&path))?;
    let (rows, shape) = (a.data, a.shape);
    let j = lcm::motion::joints_from_features(&rows)?;
    let f = lcm::motion::features::features(&j, &Default::default())?;
    let n = shape[1];
    println!(
        "stored rows {} recomputed rows {}",
        rows.len() / n,
        f.len() / n
    );
    for d in [0usize, 1, 2, 3, 4, 5, 6, 70, 200, 260] {
        let a: Vec<f32> = rows.chunks(n).step_by(6).map(|r| r[d]).collect();
        let b: Vec<f32> = f.chunks(n).step_by(6).map(|r| r[d]).collect();
        println!(
            "dim {d}\n stored {:?}\n recomp {:?}",
            a.iter()
                .map(|x| (x * 100.0).round() / 100.0)
                .collect::<Vec<_>>(),
            b.iter()
                .map(|x| (x * 100.0).round() / 100.0)
                .collect::<Vec<_>>()
        );
    }
    Ok(())
}
