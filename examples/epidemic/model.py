"""A small model run: an SIR epidemic simulated day by day.

spinyard hands a run its inputs as JSON (on stdin, and in the file named by
SPINYARD_INPUTS) and one presigned PUT URL per declared output (in the file
named by SPINYARD_UPLOADS). The model writes its outputs and uploads each one
with a plain HTTP PUT: it gets no storage or cluster credentials.
"""

import csv
import io
import json
import os
import sys
import urllib.request


def simulate(population: int, infected: int, beta: float, gamma: float, days: int) -> list[dict]:
    s, i, r = population - infected, float(infected), 0.0
    rows = []
    for day in range(days + 1):
        rows.append(
            {"day": day, "susceptible": round(s), "infected": round(i), "recovered": round(r)}
        )
        new_infections = beta * s * i / population
        recoveries = gamma * i
        s, i, r = s - new_infections, i + new_infections - recoveries, r + recoveries
    return rows


def upload(url: str, body: bytes, content_type: str) -> None:
    request = urllib.request.Request(
        url, data=body, method="PUT", headers={"Content-Type": content_type}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        if response.status >= 300:
            raise RuntimeError(f"upload answered {response.status}")


def main() -> int:
    inputs = json.load(sys.stdin)
    population = int(inputs.get("population", 10_000))
    beta, gamma = float(inputs.get("beta", 0.3)), float(inputs.get("gamma", 0.1))
    days, infected = int(inputs.get("days", 160)), int(inputs.get("infected", 10))
    if not (0 < infected <= population and 0 < days <= 3650 and beta >= 0 and gamma >= 0):
        print(
            "inputs out of range: need 0 < infected <= population, 0 < days <= 3650",
            file=sys.stderr,
        )
        return 2
    rows = simulate(population, infected, beta, gamma, days)
    peak = max(rows, key=lambda row: row["infected"])
    summary = {
        "inputs": {
            "population": population,
            "infected": infected,
            "beta": beta,
            "gamma": gamma,
            "days": days,
        },
        "r0": round(beta / gamma, 3) if gamma else None,
        "peak_day": peak["day"],
        "peak_infected": peak["infected"],
        "total_infected": rows[-1]["recovered"] + rows[-1]["infected"],
    }
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    with open(os.environ["SPINYARD_UPLOADS"]) as f:
        urls = json.load(f)
    upload(urls["summary.json"], json.dumps(summary, indent=2).encode(), "application/json")
    upload(urls["trajectory.csv"], table.getvalue().encode(), "text/csv")
    print(f"peak of {peak['infected']} infected on day {peak['day']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
