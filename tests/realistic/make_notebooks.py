"""Writes the realistic notebooks beside this file: `python tests/realistic/make_notebooks.py`.

Tutorial-style notebooks in which (nearly) every code cell is a `%%durable_step`, as a user
who wants a whole notebook to survive a kernel crash writes them: matplotlib figures and the
artists plotting calls return, pandas frames from scikit-learn's bundled data sets, fitted
pipelines and a helper that uses an estimator class imported in another step, numerical
methods whose helpers read module globals, and a notebook of fifty small steps.
tests/test_realistic.py kills their kernels part way and checks that the resumed run replays
what was done and equals an uninterrupted run.

They need only numpy, pandas, matplotlib and scikit-learn (no network: the data sets ship
with scikit-learn), run in a few seconds, and print nothing that varies between runs (seeded
generators; no timings), so that two runs can be compared output for output. A few cells
stay plain, as the README advises for process-wide settings that a replay would not redo
(a matplotlib style, pandas display options, scikit-learn's estimator display).

The notebooks are stored without outputs. Edit the cells here and run this script; the test
checks that the stored files are what it writes.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import nbformat

HERE = Path(__file__).parent


def _source(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def md(text: str) -> tuple[str, str]:
    return "markdown", _source(text)


def plain(text: str) -> tuple[str, str]:
    return "code", _source(text)


def step(name: str, text: str) -> tuple[str, str]:
    return "code", f"%%durable_step {name}\n{_source(text)}"


def header(workflow: str) -> tuple[str, str]:
    return plain(f"""
        %load_ext durable_nb
        %durable_workflow {workflow}
        """)


MATPLOTLIB_TOUR = [
    md("""
        # Matplotlib: a quick tour

        Histograms, scatter plots, subplots and styles on a seeded sample of heights and
        weights. The artists the plotting calls return (`plt.hist`'s counts, bins and
        patches, the lines of `ax.plot`, bar and error-bar containers) are kept in variables
        and read by later cells.
        """),
    header("matplotlib-tour"),
    step("imports", """
        import numpy as np
        import matplotlib.pyplot as plt
        """),
    md("A process-wide style is set in a plain cell: it runs on every *Run All*."),
    plain("""
        plt.style.use("ggplot")
        plt.rcParams["figure.figsize"] = (5, 3)
        plt.rcParams["figure.dpi"] = 72
        """),
    md("## A sample"),
    step("sample", """
        rng = np.random.default_rng(19680801)
        heights = rng.normal(170, 8, size=500)
        weights = 0.9 * heights - 85 + rng.normal(0, 6, size=500)
        print(f"{heights.size} people, mean height {heights.mean():.1f} cm, "
              f"mean weight {weights.mean():.1f} kg")
        """),
    md("## Histograms"),
    step("histogram", """
        counts, bins, patches = plt.hist(heights, bins=20, color="C0", edgecolor="white")
        plt.xlabel("height (cm)")
        plt.ylabel("people")
        plt.title("Heights")
        plt.show()
        """),
    step("modal-bin", """
        tallest = counts.argmax()
        print(f"most common: {bins[tallest]:.1f}-{bins[tallest + 1]:.1f} cm "
              f"({counts[tallest]:.0f} people)")
        [int(patch.get_height()) for patch in patches][:8]
        """),
    step("hist-weights", """
        hist = plt.hist(weights, bins=15, density=True, alpha=0.7, label="weights")
        plt.legend()
        plt.show()
        """),
    step("hist-area", """
        density, edges, container = hist
        print(f"area under the histogram: {(density * np.diff(edges)).sum():.3f}")
        highest = max(patch.get_height() for patch in container)
        print(f"{len(container.patches)} bars, the highest {highest:.4f}")
        """),
    md("## A scatter plot and a fitted line"),
    step("scatter", """
        fig, ax = plt.subplots()
        points = ax.scatter(heights, weights, s=6, c=weights, cmap="viridis")
        fig.colorbar(points, ax=ax, label="weight (kg)")
        ax.set(xlabel="height (cm)", ylabel="weight (kg)", title="Height and weight")
        plt.show()
        """),
    step("fit-line", """
        slope, intercept = np.polyfit(heights, weights, 1)
        xs = np.linspace(heights.min(), heights.max(), 50)
        (line,) = ax.plot(xs, slope * xs + intercept, color="black", lw=1,
                          label=f"fit: {slope:.2f} kg/cm")
        ax.legend()
        fig
        """),
    step("line-data", """
        x_fit, y_fit = line.get_data()
        print(f"from ({x_fit[0]:.0f}, {y_fit[0]:.1f}) to ({x_fit[-1]:.0f}, {y_fit[-1]:.1f})")
        print(line.get_label(), line.get_color(), len(points.get_offsets()), "points")
        """),
    md("## Subplots"),
    step("subplots", """
        t = np.linspace(0, 2 * np.pi, 200)
        curves = {"sin": np.sin(t), "cos": np.cos(t), "sin 2t": np.sin(2 * t),
                  "damped": np.exp(-t / 3) * np.sin(3 * t)}
        fig2, axes = plt.subplots(1, 2, figsize=(6, 2.5), sharey=True)
        waves = {}
        for panel, (name, values) in zip([axes[0], axes[0], axes[1], axes[1]], curves.items()):
            (waves[name],) = panel.plot(t, values, label=name)
        for panel in axes:
            panel.legend(loc="lower left")
        fig2.tight_layout()
        plt.show()
        """),
    step("wave-peaks", """
        for name, artist in waves.items():
            y = artist.get_ydata()
            print(f"{name:>7}: max {y.max():+.3f} at t={t[y.argmax()]:.2f}")
        """),
    md("## Styles, bars and error bars"),
    step("bars", """
        groups = np.digitize(heights, [160, 170, 180])
        labels = ["<160", "160-170", "170-180", "180+"]
        group_sizes = np.bincount(groups, minlength=4)
        with plt.style.context("bmh"):
            fig3, ax3 = plt.subplots()
            bars = ax3.bar(labels, group_sizes, color=["C0", "C1", "C2", "C3"])
            ax3.bar_label(bars)
            ax3.set_title("People per height band")
            plt.show()
        """),
    step("bar-heights", """
        print({label: int(bar.get_height()) for label, bar in zip(labels, bars)})
        """),
    step("errorbar", """
        means = [weights[groups == band].mean() for band in range(4)]
        spreads = [weights[groups == band].std() for band in range(4)]
        errors = plt.errorbar(range(4), means, yerr=spreads, fmt="o-", capsize=4)
        plt.xticks(range(4), labels)
        plt.ylabel("weight (kg)")
        plt.show()
        """),
    step("errorbar-data", """
        data_line, caplines, barlinecols = errors
        print([round(float(v), 1) for v in data_line.get_ydata()], len(caplines), "caps")
        """),
    md("## A two-dimensional histogram"),
    step("hist2d", """
        grid, xedges, yedges = np.histogram2d(heights, weights, bins=12)
        fig4, ax4 = plt.subplots()
        image = ax4.imshow(grid.T, origin="lower", cmap="magma", aspect="auto",
                           extent=(xedges[0], xedges[-1], yedges[0], yedges[-1]))
        fig4.colorbar(image, ax=ax4, label="people")
        plt.show()
        """),
    step("summary", """
        summary = {"people": int(heights.size), "slope": round(float(slope), 3),
                   "modal bin": f"{bins[tallest]:.0f}-{bins[tallest + 1]:.0f}",
                   "densest cell": int(grid.max()), "colour limits": image.get_clim()}
        summary
        """),
]


PANDAS_DATASETS = [
    md("""
        # Exploring scikit-learn's data sets with pandas

        Iris, wine and diabetes as data frames (`as_frame=True`): summaries, derived
        columns, group-bys, bins, pivots and a plot.
        """),
    header("pandas-datasets"),
    step("imports", """
        import numpy as np
        import pandas as pd
        from sklearn.datasets import load_diabetes, load_iris, load_wine
        """),
    md("Display options are process-wide: a plain cell sets them on every *Run All*."),
    plain("""
        pd.set_option("display.precision", 3)
        pd.set_option("display.max_columns", 12)
        """),
    md("## Iris"),
    step("load-iris", """
        iris = load_iris(as_frame=True)
        print(iris.frame.shape, iris.target_names.tolist())
        iris.frame.head()
        """),
    step("iris-frame", """
        df = iris.frame.copy()
        df["species"] = pd.Categorical.from_codes(iris.target, iris.target_names)
        df.sample(5, random_state=0)
        """),
    step("describe", """
        df.describe()
        """),
    step("derived", """
        df["petal area"] = df["petal length (cm)"] * df["petal width (cm)"]
        df["sepal ratio"] = df["sepal length (cm)"] / df["sepal width (cm)"]
        df[["petal area", "sepal ratio"]].agg(["mean", "min", "max"])
        """),
    step("by-species", """
        by_species = df.groupby("species", observed=True).mean()
        by_species
        """),
    step("largest", """
        df.nlargest(3, "petal area")[["species", "petal area"]]
        """),
    md("## Wine"),
    step("load-wine", """
        wine = load_wine(as_frame=True)
        wine_df = wine.frame
        print(f"{len(wine_df)} wines, {len(wine.feature_names)} measurements")
        wine_df.iloc[:3, :6]
        """),
    step("cultivars", """
        wine_df["cultivar"] = wine_df["target"].map(dict(enumerate(wine.target_names)))
        wine_df["cultivar"].value_counts().sort_index()
        """),
    step("wine-stats", """
        columns = ["alcohol", "malic_acid", "color_intensity", "proline"]
        wine_df.groupby("cultivar")[columns].agg(["mean", "std"]).round(2)
        """),
    step("correlations", """
        corr = wine_df.drop(columns=["target", "cultivar"]).corr()
        upper = corr.where(np.triu(np.ones(corr.shape, dtype=bool), k=1))
        strongest = upper.stack().abs().nlargest(5)
        strongest
        """),
    md("## Diabetes"),
    step("load-diabetes", """
        diabetes = load_diabetes(as_frame=True, scaled=False)
        X, y = diabetes.data, diabetes.target
        X.describe().T[["mean", "std", "min", "max"]]
        """),
    step("age-bands", """
        X = X.assign(age_band=pd.cut(X["age"], bins=[0, 30, 45, 60, 100],
                                     labels=["<30", "30-45", "45-60", "60+"]),
                     progression=y)
        X.groupby("age_band", observed=True)["progression"].describe()
        """),
    step("pivot", """
        X["sex"] = X["sex"].map({1.0: "F", 2.0: "M"})
        pivot = X.pivot_table(index="age_band", columns="sex", values="bmi", aggfunc="mean",
                              observed=True).round(1)
        pivot
        """),
    step("melt", """
        long = pivot.reset_index().melt(id_vars="age_band", var_name="sex", value_name="mean bmi")
        long
        """),
    md("## A plot and a summary"),
    step("plot", """
        import matplotlib.pyplot as plt

        ax = by_species[["petal area", "sepal ratio"]].plot.bar(
            rot=0, figsize=(5, 3), title="Iris: derived measurements")
        ax.set_xlabel("")
        plt.show()
        """),
    step("report", """
        print(f"iris: {len(df)} flowers, wine: {len(wine_df)} wines, diabetes: {len(X)} patients")
        print("widest petal area:", df.loc[df["petal area"].idxmax(), "species"])
        """),
]


SKLEARN_PIPELINES = [
    md("""
        # scikit-learn: pipelines, cross-validation and a small grid search

        A scaler made in one cell and used by a pipeline fitted in the next, cross-validated
        scores, a grid search, and a helper function, defined in its own cell, that fits a
        `LinearRegression` imported in another one.
        """),
    header("sklearn-pipelines"),
    step("imports", """
        import numpy as np
        import pandas as pd
        from sklearn.datasets import load_diabetes, load_wine
        from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
        """),
    md("""
        Estimators display as text: their HTML display numbers its elements with a counter
        that lives in the process. A plain cell sets it on every *Run All*.
        """),
    plain("""
        import sklearn

        sklearn.set_config(display="text")
        """),
    md("## Classifying wines"),
    step("data", """
        X, y = load_wine(return_X_y=True, as_frame=True)
        X_train, X_test, y_train, y_test = train_test_split(
            X, y, test_size=0.3, random_state=42, stratify=y)
        print(X_train.shape, X_test.shape)
        """),
    step("scaler", """
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler()
        scaler
        """),
    step("pipeline", """
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        pipe = make_pipeline(scaler, LogisticRegression(max_iter=1000))
        pipe.fit(X_train, y_train)
        """),
    step("evaluate", """
        from sklearn.metrics import classification_report, confusion_matrix

        predicted = pipe.predict(X_test)
        print(classification_report(y_test, predicted, digits=3))
        confusion_matrix(y_test, predicted)
        """),
    step("scaler-means", """
        pd.Series(scaler.mean_, index=X.columns).round(2).head(6)
        """),
    step("cross-validate", """
        scores = cross_val_score(pipe, X, y, cv=5)
        print("accuracy per fold:", scores.round(3))
        print(f"mean {scores.mean():.3f} +/- {scores.std():.3f}")
        """),
    step("grid-search", """
        # The fitted search records its fit times, which differ on every execution:
        # NBVAL_IGNORE_OUTPUT
        param_grid = {"logisticregression__C": [0.01, 0.1, 1.0, 10.0]}
        search = GridSearchCV(pipe, param_grid, cv=3)
        search.fit(X_train, y_train);
        """),
    step("grid-results", """
        print("best C:", search.best_params_["logisticregression__C"])
        columns = ["param_logisticregression__C", "mean_test_score", "rank_test_score"]
        results = pd.DataFrame(search.cv_results_)[columns]  # without the fit times
        results
        """),
    step("test-score", """
        print(f"test accuracy of the best model: {search.score(X_test, y_test):.3f}")
        """),
    md("## Regression, one feature at a time"),
    step("regression-data", """
        diabetes = load_diabetes(as_frame=True)
        frame = diabetes.frame
        frame.shape
        """),
    step("linear-import", """
        from sklearn.linear_model import LinearRegression
        """),
    step("helper", """
        def fit_line(data, feature, target="target"):
            \"\"\"Fit target ~ feature: the slope, the intercept and R².\"\"\"
            model = LinearRegression()
            model.fit(data[[feature]], data[target])
            return model.coef_[0], model.intercept_, model.score(data[[feature]], data[target])
        """),
    step("bmi", """
        slope, intercept, r2 = fit_line(frame, "bmi")
        print(f"target = {slope:.1f} * bmi + {intercept:.1f}  (R² {r2:.3f})")
        """),
    step("every-feature", """
        fits = pd.DataFrame([fit_line(frame, feature) for feature in diabetes.feature_names],
                            index=diabetes.feature_names, columns=["slope", "intercept", "r2"])
        fits.sort_values("r2", ascending=False).round(3)
        """),
    step("all-features", """
        full = LinearRegression().fit(frame[diabetes.feature_names], frame["target"])
        full_r2 = full.score(frame[diabetes.feature_names], frame["target"])
        print(f"all ten features: R² {full_r2:.3f}")
        print(f"best single feature: {fits['r2'].idxmax()} (R² {fits['r2'].max():.3f})")
        """),
    step("ridge", """
        from sklearn.linear_model import RidgeCV

        ridge = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
        ridge_scores = cross_val_score(ridge, frame[diabetes.feature_names], frame["target"],
                                       cv=5, scoring="r2")
        print("ridge R² per fold:", ridge_scores.round(3))
        """),
]


NUMERICAL_METHODS = [
    md("""
        # Numerical methods: roots, integrals and an ODE

        Newton's method and bisection, the trapezoid and Simpson rules with their orders of
        convergence, and Euler against Runge-Kutta. The helpers read module globals: `math`,
        imported in a step, and `SCALE`, set in a plain cell.
        """),
    header("numerical-methods"),
    step("imports", """
        import math
        """),
    md("Parameters, in a plain cell."),
    plain("""
        SCALE = 2.0
        TOLERANCE = 1e-12
        """),
    step("helpers", """
        def f(x):
            return math.sqrt(x) * SCALE


        def f_prime(x):
            return SCALE / (2 * math.sqrt(x))


        print(f(4.0), f_prime(4.0))
        """),
    md("## Roots"),
    step("newton", """
        def newton(g, dg, x0, tol=TOLERANCE, max_iter=50):
            \"\"\"Newton's method: the root and the iterates.\"\"\"
            iterates = [x0]
            for _ in range(max_iter):
                x = iterates[-1]
                step = g(x) / dg(x)
                iterates.append(x - step)
                if abs(step) < tol:
                    break
            return iterates[-1], iterates
        """),
    step("sqrt2", """
        root, iterates = newton(lambda x: x * x - 2, lambda x: 2 * x, 1.0)
        for k, x in enumerate(iterates):
            print(f"{k}: {x:.15f}  error {abs(x - math.sqrt(2)):.2e}")
        """),
    step("f-equals-3", """
        root_f, _ = newton(lambda x: f(x) - 3, f_prime, 1.0)
        print(f"f(x) = 3 at x = {root_f:.12f} (exactly {(3 / SCALE) ** 2})")
        """),
    step("dottie", """
        dottie, dottie_iterates = newton(lambda x: math.cos(x) - x, lambda x: -math.sin(x) - 1, 1.0)
        print(f"cos(x) = x at {dottie:.12f} after {len(dottie_iterates) - 1} steps")
        """),
    step("bisection", """
        def bisect(g, a, b, tol=1e-10):
            \"\"\"Bisection on [a, b], where g changes sign: the root and the halvings.\"\"\"
            halvings = 0
            while b - a > tol:
                middle = (a + b) / 2
                if math.copysign(1, g(a)) == math.copysign(1, g(middle)):
                    a = middle
                else:
                    b = middle
                halvings += 1
            return (a + b) / 2, halvings
        """),
    step("compare-roots", """
        by_bisection, halvings = bisect(lambda x: math.cos(x) - x, 0.0, 1.0)
        print(f"bisection: {by_bisection:.10f} after {halvings} halvings; "
              f"newton: {len(dottie_iterates) - 1} steps; "
              f"difference {abs(by_bisection - dottie):.1e}")
        """),
    md("## Integrals"),
    step("integrators", """
        def trapezoid(g, a, b, n):
            h = (b - a) / n
            return h * (0.5 * g(a) + sum(g(a + i * h) for i in range(1, n)) + 0.5 * g(b))


        def simpson(g, a, b, n):
            h = (b - a) / n
            inner = sum((4 if i % 2 else 2) * g(a + i * h) for i in range(1, n))
            return h / 3 * (g(a) + inner + g(b))
        """),
    step("exact", """
        exact = SCALE * 2 / 3 * 4 ** 1.5  # the integral of f from 0 to 4
        print(f"exact: {exact:.12f}, trapezoid(16): {trapezoid(f, 0, 4, 16):.12f}, "
              f"simpson(16): {simpson(f, 0, 4, 16):.12f}")
        """),
    step("convergence", """
        rows = [(n, abs(trapezoid(math.exp, 0, 1, n) - (math.e - 1)),
                 abs(simpson(math.exp, 0, 1, n) - (math.e - 1)))
                for n in (4, 8, 16, 32, 64, 128)]
        for n, trapezoid_error, simpson_error in rows:
            print(f"{n:4d}  {trapezoid_error:.3e}  {simpson_error:.3e}")
        """),
    step("orders", """
        orders = [(math.log2(rows[i][1] / rows[i + 1][1]), math.log2(rows[i][2] / rows[i + 1][2]))
                  for i in range(len(rows) - 1)]
        print("trapezoid orders:", [round(o[0], 2) for o in orders])
        print("simpson orders:  ", [round(o[1], 2) for o in orders])
        """),
    step("numpy-check", """
        import numpy as np

        xs = np.linspace(0, 4, 1001)
        print(f"numpy trapezoid: {np.trapezoid(SCALE * np.sqrt(xs), xs):.6f}, exact {exact:.6f}")
        nodes, weights = np.polynomial.legendre.leggauss(5)
        gauss = sum(w * math.exp((x + 1) / 2) for x, w in zip(nodes, weights)) / 2
        print(f"5-point Gauss-Legendre for exp on [0, 1]: error {abs(gauss - (math.e - 1)):.1e}")
        """),
    md("## An ordinary differential equation: y' = -2y, y(0) = 1"),
    step("solvers", """
        def euler(rhs, y0, t0, t1, n):
            h, y, t = (t1 - t0) / n, y0, t0
            for _ in range(n):
                y, t = y + h * rhs(t, y), t + h
            return y


        def rk4(rhs, y0, t0, t1, n):
            h, y, t = (t1 - t0) / n, y0, t0
            for _ in range(n):
                k1 = rhs(t, y)
                k2 = rhs(t + h / 2, y + h / 2 * k1)
                k3 = rhs(t + h / 2, y + h / 2 * k2)
                k4 = rhs(t + h, y + h * k3)
                y, t = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), t + h
            return y


        def decay(t, y):
            return -SCALE * y
        """),
    step("ode-errors", """
        target = math.exp(-SCALE)
        ode_errors = {n: (abs(euler(decay, 1.0, 0.0, 1.0, n) - target),
                          abs(rk4(decay, 1.0, 0.0, 1.0, n) - target)) for n in (10, 20, 40, 80)}
        for n, (euler_error, rk4_error) in ode_errors.items():
            print(f"n={n:3d}  euler {euler_error:.2e}  rk4 {rk4_error:.2e}")
        """),
    step("plot", """
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3), dpi=72)
        ns = [row[0] for row in rows]
        ax.loglog(ns, [row[1] for row in rows], "o-", label="trapezoid")
        ax.loglog(ns, [row[2] for row in rows], "s-", label="simpson")
        ax.set(xlabel="intervals", ylabel="error", title="exp on [0, 1]")
        ax.legend()
        plt.show()
        """),
    step("summary", """
        {"sqrt(2)": round(root, 12), "dottie": round(dottie, 12), "f = 3 at": round(root_f, 9),
         "simpson order": round(orders[-1][1], 1), "rk4 error at n=80": f"{ode_errors[80][1]:.1e}"}
        """),
]


SMALL_STEPS = [
    md("""
        # Sales records, one small step at a time

        Fifty small cells, each a durable step, as a tutorial on plain Python, numpy and
        pandas data handling would have them: parse a CSV by hand, count, group, a dataclass,
        a notebook class, arrays, a data frame, a memoised function.
        """),
    header("many-small-steps"),
    step("import-std", """
        import collections
        import itertools
        import json
        import re
        import statistics
        """),
    step("import-more", """
        from dataclasses import dataclass
        from datetime import date
        from functools import reduce
        """),
    step("import-numpy", """
        import numpy as np
        """),
    step("import-pandas", """
        import pandas as pd
        """),
    step("raw", """
        raw = \"\"\"
        date,city,product,units,price
        2024-01-03,Lyon,apples,12,0.5
        2024-01-03,Paris,pears,7,0.8
        2024-01-04,Lyon,plums,3,1.2
        2024-01-05,Nantes,apples,20,0.45
        2024-01-08,Paris,apples,15,0.55
        2024-01-09,Lille,pears,4,0.9
        2024-01-10,Nantes,plums,9,1.1
        2024-01-11,Lyon,pears,6,0.85
        2024-01-12,Paris,plums,2,1.3
        2024-01-15,Lille,apples,18,0.5
        2024-01-16,Lyon,apples,10,0.5
        2024-01-17,Nantes,pears,5,0.8
        2024-01-18,Paris,apples,8,0.6
        2024-01-19,Lille,plums,6,1.15
        2024-01-22,Lyon,plums,4,1.25
        2024-01-23,Paris,pears,11,0.75
        2024-01-24,Nantes,apples,14,0.5
        2024-01-25,Lille,pears,3,0.95
        \"\"\"
        """),
    step("lines", """
        lines = raw.strip().splitlines()
        header = lines[0].split(",")
        len(lines), header
        """),
    step("records", """
        records = [dict(zip(header, line.split(","))) for line in lines[1:]]
        records[0]
        """),
    step("types", """
        for record in records:
            record["units"] = int(record["units"])
            record["price"] = float(record["price"])
        records[:2]
        """),
    step("cities", """
        cities = sorted({record["city"] for record in records})
        cities
        """),
    step("product-counts", """
        products = collections.Counter(record["product"] for record in records)
        products.most_common(3)
        """),
    step("revenue", """
        revenue = [record["units"] * record["price"] for record in records]
        round(sum(revenue), 2)
        """),
    step("by-city", """
        by_city = collections.defaultdict(float)
        for record, amount in zip(records, revenue):
            by_city[record["city"]] += amount
        {city: round(total, 2) for city, total in sorted(by_city.items())}
        """),
    step("parse-date", """
        def parse_date(text):
            return date.fromisoformat(text)
        """),
    step("dates", """
        dates = [parse_date(record["date"]) for record in records]
        min(dates), max(dates)
        """),
    step("span", """
        span = max(dates) - min(dates)
        span.days
        """),
    step("sale-class", """
        @dataclass
        class Sale:
            day: date
            city: str
            product: str
            units: int
            price: float

            @property
            def revenue(self):
                return self.units * self.price
        """),
    step("sales", """
        sales = [Sale(parse_date(r["date"]), r["city"], r["product"], r["units"], r["price"])
                 for r in records]
        sales[0]
        """),
    step("big-sales", """
        big = [sale for sale in sales if sale.revenue > 8]
        len(big), [sale.city for sale in big]
        """),
    step("months", """
        pattern = re.compile(r"^(\\d{4})-(\\d{2})-(\\d{2})$")
        months = sorted({pattern.match(record["date"]).group(2) for record in records})
        months
        """),
    step("weekdays", """
        weekdays = collections.Counter(day.strftime("%A") for day in dates)
        sorted(weekdays.items())
        """),
    step("pairs", """
        pairs = list(itertools.combinations(cities, 2))
        len(pairs), pairs[:3]
        """),
    step("grouped", """
        by_product = sorted(sales, key=lambda sale: sale.product)
        grouped = {product: [sale.units for sale in group]
                   for product, group in itertools.groupby(by_product,
                                                           key=lambda sale: sale.product)}
        grouped
        """),
    step("means", """
        mean_units = {product: statistics.mean(units) for product, units in grouped.items()}
        mean_units
        """),
    step("to-json", """
        payload = json.dumps(mean_units, sort_keys=True, indent=1)
        print(payload)
        """),
    step("from-json", """
        restored = json.loads(payload)
        restored == mean_units
        """),
    step("arrays", """
        units = np.array([sale.units for sale in sales])
        prices = np.array([sale.price for sale in sales])
        units.mean(), prices.std().round(4)
        """),
    step("revenue-array", """
        revenue_array = units * prices
        revenue_array.round(2)
        """),
    step("top-three", """
        order = np.argsort(-revenue_array, kind="stable")
        [(sales[i].city, sales[i].product) for i in order[:3]]
        """),
    step("outer", """
        matrix = np.outer(units[:4], prices[:4]).round(2)
        matrix
        """),
    step("cumulative", """
        cumulative = np.cumsum(revenue_array)
        print(f"running total after each sale: {cumulative.round(1)}")
        """),
    step("frame", """
        df = pd.DataFrame([vars(sale) for sale in sales])
        df.head()
        """),
    step("frame-revenue", """
        df["revenue"] = df["units"] * df["price"]
        round(df["revenue"].sum(), 2)
        """),
    step("frame-dates", """
        df["day"] = pd.to_datetime(df["day"])
        df.dtypes
        """),
    step("city-totals", """
        city_totals = df.groupby("city")["revenue"].sum().sort_values(ascending=False)
        city_totals
        """),
    step("pivot", """
        pivot = df.pivot_table(index="city", columns="product", values="units", aggfunc="sum",
                               fill_value=0)
        pivot
        """),
    step("weekly", """
        weekly = df.set_index("day").resample("W")["revenue"].sum()
        weekly
        """),
    step("shares", """
        df["share"] = df["revenue"] / df.groupby("city")["revenue"].transform("sum")
        df[["city", "product", "share"]].round(3).head()
        """),
    step("best-per-product", """
        ranked = df.assign(rank=df.groupby("product")["revenue"].rank(ascending=False,
                                                                      method="first"))
        ranked.query("rank == 1")[["product", "city", "revenue"]]
        """),
    step("inventory-class", """
        class Inventory:
            def __init__(self):
                self.stock = {}

            def add(self, product, count):
                self.stock[product] = self.stock.get(product, 0) + count

            def remove(self, product, count):
                if self.stock.get(product, 0) < count:
                    raise ValueError(f"only {self.stock.get(product, 0)} {product} left")
                self.stock[product] -= count
        """),
    step("stock-up", """
        inventory = Inventory()
        for sale in sales:
            inventory.add(sale.product, sale.units * 2)
        inventory.stock
        """),
    step("sell", """
        for sale in sales[:6]:
            inventory.remove(sale.product, sale.units)
        inventory.stock
        """),
    step("low-stock", """
        low = sorted(product for product, count in inventory.stock.items() if count < 60)
        low
        """),
    step("price-bands", """
        def price_band(price):
            return "cheap" if price < 0.7 else "dear"


        df["band"] = df["price"].map(price_band)
        df["band"].value_counts()
        """),
    step("summary-lines", """
        summary_lines = [f"{city}: {total:.2f}" for city, total in city_totals.items()]
        print("\\n".join(summary_lines))
        """),
    step("report", """
        report = {"rows": len(df), "cities": len(cities), "best city": city_totals.index[0],
                  "revenue": round(float(df["revenue"].sum()), 2)}
        report
        """),
    step("checks", """
        checks = [report["rows"] == len(records), abs(report["revenue"] - sum(revenue)) < 1e-9]
        all(checks)
        """),
    step("reduce", """
        units_product = reduce(lambda a, b: a * b % 1_000_003, units.tolist(), 1)
        units_product
        """),
    step("memo", """
        memo = {0: 0, 1: 1}


        def fib(n):
            if n not in memo:
                memo[n] = fib(n - 1) + fib(n - 2)
            return memo[n]
        """),
    step("fib", """
        fib(60), len(memo)
        """),
    step("fib-more", """
        fib(90), len(memo)
        """),
    step("final", """
        print(report, f"fib(90) = {memo[90]}", sep="\\n")
        """),
]


NOTEBOOKS: dict[str, list[tuple[str, str]]] = {
    "matplotlib-tour": MATPLOTLIB_TOUR,
    "pandas-datasets": PANDAS_DATASETS,
    "sklearn-pipelines": SKLEARN_PIPELINES,
    "numerical-methods": NUMERICAL_METHODS,
    "many-small-steps": SMALL_STEPS,
}


def build(stem: str) -> Any:
    """The notebook, with cell ids fixed so that the stored file is the same on every write."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for number, (kind, source) in enumerate(NOTEBOOKS[stem]):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        notebook.cells.append(make(source, id=f"{stem}-{number}"))
    nbformat.validate(notebook)
    return notebook


def text_of(stem: str) -> str:
    return nbformat.writes(build(stem)) + "\n"


def main() -> int:
    for stem in NOTEBOOKS:
        path = HERE / f"{stem}.ipynb"
        path.write_text(text_of(stem), encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
