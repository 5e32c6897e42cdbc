/// Great-circle distance in kilometres.
pub fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * 6371.0 * a.sqrt().min(1.0).asin()
}

#[cfg(test)]
mod tests {
    #[test]
    fn paris_to_lyon() {
        let d = super::haversine_km(48.8566, 2.3522, 45.764, 4.8357);
        assert!((d - 392.0).abs() < 3.0, "{d}");
    }
}
