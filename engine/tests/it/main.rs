mod format_props;
