"""Result tables and files, metrics of a run, evaluation, paper tables, reports."""
