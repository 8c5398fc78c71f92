"""pelmark.evaluate: ``pelmark eval``, the paper's Table 1 and more for trained runs.

predict    ground truth of a store split at model size, and a run's argmax predictions
reference  the mean-position predictor (what a model scores by learning only the average)
units      landmark errors in model px, detector px, detector mm and isocentre mm
pose       pose errors after registering the predicted landmarks to the CT's 3D landmarks
refine     ``--refine``: all CT landmarks projected under the robust pose of the found landmarks
stats      cluster-bootstrap intervals, paired comparisons, robust error figures (numpy)
stat_tables  table1_ci.csv, comparison.csv, robust.csv
tables     Table-1 CSVs, per-image CSVs, the text table
figures    sample montages, per-landmark error bars, error CDFs
runner     ``evaluate_runs``: checks the inputs, then writes every output into OUT at once
"""
